"""What an embed request may ask of the loaded model: its prompt, its Matryoshka dimensions, its
truncation policy. The protocol checks the fields' types; this module checks them against the model
(prompts it defines, dims it declares, tokens it reads) and turns them into the worker's plan.

Backend options that change the answers (all optional): ``default_prompt_name`` (a prompt applied when
a request names none; default: the model's own ``default_prompt_name``), ``matryoshka_dimensions``
(a list of ints: dims the model was trained to be cut at, when its config.json does not say),
``allow_any_dimensions`` (accept any ``dimensions`` from 1 to the model's dim).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from akidb_embed.protocol.errors import BackendUnavailable, BadRequest, InputTooLong
from akidb_embed.protocol.messages import EmbedRequest
from akidb_embed.workers.backends.base import ModelInfo


@dataclass(frozen=True)
class ModelLimits:
    dim: int
    max_tokens: int
    prompts: Mapping[str, str]
    default_prompt_name: str | None
    matryoshka_dims: tuple[int, ...]
    allow_any_dimensions: bool

    @classmethod
    def from_info(cls, info: ModelInfo, options: Mapping[str, Any]) -> ModelLimits:
        default = options.get("default_prompt_name", info.default_prompt_name)
        if default is not None and default not in info.prompts:
            raise BackendUnavailable(f"default_prompt_name {default!r} is not a prompt of {info.model}; "
                             f"its prompts: {_names(info.prompts)}")
        dims = options.get("matryoshka_dimensions") or info.matryoshka_dims
        return cls(info.dim, info.max_tokens, dict(info.prompts), default,
                   tuple(sorted({int(d) for d in dims if 0 < int(d) <= info.dim}, reverse=True)),
                   bool(options.get("allow_any_dimensions", False)))

    def prompt(self, req: EmbedRequest) -> str:
        """The prefix for every text of ``req``: its literal ``prompt``, its ``prompt_name``, or the default."""
        if req.prompt is not None:
            return req.prompt
        name = req.prompt_name if req.prompt_name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            raise BadRequest(f"unknown prompt_name {name[:100]!r}; this model's prompts: {_names(self.prompts)}")
        return self.prompts[name]

    def dimensions(self, req: EmbedRequest) -> int | None:
        """How many leading dims to keep (None: all), or BAD_REQUEST when the model cannot be cut there."""
        n = req.dimensions
        if n is None or n == self.dim:
            return None
        if self.allow_any_dimensions and 0 < n <= self.dim:
            return n
        if n in self.matryoshka_dims:
            return n
        if not self.matryoshka_dims:
            raise BadRequest(f"dimensions={n}: this model declares no Matryoshka dimensions, so its vectors "
                             f"cannot be shortened (its dim is {self.dim}; a backend may set allow_any_dimensions)")
        raise BadRequest(f"dimensions={n} is not one of this model's Matryoshka dimensions "
                         f"{list(self.matryoshka_dims)}")

    def refuse_too_long(self, req: EmbedRequest, counts: Sequence[int]) -> None:
        """With ``truncate = "none"``, INPUT_TOO_LONG for the first text over ``max_tokens``."""
        if req.truncate != "none":
            return
        for i, n in enumerate(counts):
            if n > self.max_tokens:
                raise InputTooLong(f"texts[{i}] has {n} tokens; the model reads at most {self.max_tokens} "
                                   "(truncate='none'; send truncate='end' or 'start' to cut it instead)")


def _names(prompts: Mapping[str, str]) -> str:
    return ", ".join(repr(p) for p in sorted(prompts)) or "none"
