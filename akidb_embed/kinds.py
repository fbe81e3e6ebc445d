"""The one table of backend kinds: name, aliases, implementing module and option keys.

Used by config validation (supervisor) and by the worker's backend registry. Standard library only:
importing it loads no runtime, no numpy.
"""
from __future__ import annotations

from dataclasses import dataclass

# request-option defaults every kind accepts (checked by the worker: akidb_embed/workers/request_options.py)
_REQUEST_KEYS = frozenset({"default_prompt_name", "matryoshka_dimensions", "allow_any_dimensions"})
_MODEL_KEYS = frozenset({"cache_dir", "allow_download", "max_seq_length"}) | _REQUEST_KEYS


@dataclass(frozen=True)
class Kind:
    name: str                       # canonical kind, as reported in info/status
    aliases: tuple[str, ...]        # other names accepted in config.toml
    target: str                     # "module:Class" implementing it (imported only in a worker)
    options: frozenset[str]         # kind-specific keys valid in a [backends.NAME] table


KINDS_TABLE: tuple[Kind, ...] = (
    Kind("mock", (), "akidb_embed.workers.backends.mock:MockBackend",
         frozenset({"dim", "delay_ms", "startup_delay_ms", "startup_crash", "startup_crash_file",
                    "load_fail_file", "crash_on", "hang_on", "fail_on", "leak_mb_per_request", "max_tokens",
                    "ignore_sigterm"})
         | _REQUEST_KEYS),
    Kind("onnx", ("python-bridge",), "akidb_embed.workers.backends.onnx:OnnxBackend",
         _MODEL_KEYS | {"threads", "inter_op_threads", "providers", "graph_optimization", "quantize", "spin"}),
    Kind("sentence-transformers", ("torch",), "akidb_embed.workers.backends.st:SentenceTransformersBackend",
         _MODEL_KEYS | {"device", "threads"}),
    Kind("mlx", (), "akidb_embed.workers.backends.mlx:MlxBackend", _MODEL_KEYS | {"quantize"}),
)

BY_NAME: dict[str, Kind] = {k.name: k for k in KINDS_TABLE}
BY_NAME.update({alias: k for k in KINDS_TABLE for alias in k.aliases})
KIND_NAMES: tuple[str, ...] = tuple(BY_NAME)          # every accepted name, canonical ones first
ALIASES: dict[str, str] = {alias: k.name for k in KINDS_TABLE for alias in k.aliases}


def kind_of(name: str) -> Kind:
    """The kind for a name or alias; raises KeyError for unknown names."""
    return BY_NAME[name]
