"""What a sentence-transformers model directory says about itself: max length, pooling, Dense layers,
normalization, prompts, Matryoshka dims, padding side, and the tokenizer set up to match (pad to the
longest text, truncate at max_seq_length). Shared by the onnx and mlx backends and the quantizer;
``tokenizers`` and ``numpy`` are imported only inside. The pipeline after the transformer (pooling,
Dense, Normalize) runs in :mod:`akidb_embed.models.pipeline`."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken")
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean",
                        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_lasttoken": "lasttoken"}
# Dense activation functions sentence-transformers records (class paths), reproduced in numpy
DENSE_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "Sigmoid")


class DenseSpec(NamedTuple):
    """One sentence-transformers Dense module: ``activation(x @ W.T + b)``, weights in ``path``."""

    path: str
    in_features: int
    out_features: int
    bias: bool
    activation: str            # one of DENSE_ACTIVATIONS


class SentenceConfig(NamedTuple):
    """The pipeline sentence-transformers would run after the transformer, from ``modules.json``."""

    max_seq_length: int
    pooling: tuple[str, ...]   # concatenated in this order, as sentence-transformers does
    normalize: bool            # a Normalize module follows pooling (and the Dense layers)
    do_lower_case: bool
    dense: tuple[DenseSpec, ...] = ()
    prompts: Mapping[str, str] = MappingProxyType({})   # name -> prefix (config_sentence_transformers.json)
    default_prompt_name: str | None = None
    matryoshka_dims: tuple[int, ...] = ()  # config.json matryoshka_dimensions (as vLLM reads them)
    padding_side: str = "right"            # what the tokenizer declares (tokenizer_config.json)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def _pooling_modes(config: dict) -> tuple[str, ...]:
    mode = config.get("pooling_mode")
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key))
        extra = [k for k in ("pooling_mode_weightedmean_tokens",) if config.get(k)]
        if extra:
            raise ValueError(f"pooling {extra} is not supported (supported: {POOLING_MODES})")
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ValueError(f"pooling {bad or 'none'} is not supported (supported: {POOLING_MODES})")
    if config.get("include_prompt") is False:
        raise ValueError("pooling with include_prompt = false (prompt tokens left out of pooling) is not supported")
    return modes


def _dense(model_dir: Path, path: str) -> DenseSpec:
    config = _read_json(model_dir / path / "config.json")
    activation = str(config.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
    if activation not in DENSE_ACTIVATIONS:
        raise ValueError(f"Dense activation {activation} in {model_dir / path} is not supported "
                         f"(supported: {DENSE_ACTIVATIONS})")
    return DenseSpec(path, int(config["in_features"]), int(config["out_features"]),
                     bool(config.get("bias", True)), activation)


def _matryoshka(model_dir: Path) -> tuple[int, ...]:
    config = _read_json(model_dir / "config.json")
    dims = config.get("matryoshka_dimensions")
    if isinstance(dims, list) and all(isinstance(d, int) and d > 0 for d in dims):
        return tuple(sorted(set(dims), reverse=True))
    return ()


def _prompts(model_dir: Path) -> tuple[dict[str, str], str | None]:
    config = _read_json(model_dir / "config_sentence_transformers.json")
    prompts = config.get("prompts") or {}
    prompts = {str(k): str(v) for k, v in prompts.items() if isinstance(v, str)} if isinstance(prompts, dict) else {}
    default = config.get("default_prompt_name")
    return prompts, (default if isinstance(default, str) and default in prompts else None)


def read_sentence_config(model_dir: Path) -> SentenceConfig:
    """Pooling, normalization and max length from ``modules.json`` and friends.

    Without ``modules.json`` (a plain transformers model) this is mean pooling, no normalization, except for
    Qwen3 and Gemma3 (see ``_ARCHITECTURE_DEFAULTS``). Raises ValueError for modules this package can't
    reproduce (weighted-mean pooling, Dense before pooling, ...).
    """
    listed: Any = _read_json(model_dir / "modules.json")
    modules: list[dict[str, Any]] = listed or [
        {"type": "sentence_transformers.models.Transformer", "path": ""},
        {"type": "sentence_transformers.models.Pooling", "path": "", "_default": True}]
    if not (model_dir / "modules.json").is_file():
        known = _ARCHITECTURE_DEFAULTS.get(str(_read_json(model_dir / "config.json").get("model_type")))
        if known is not None:
            return _architecture_default(model_dir, *known)
    pooling: tuple[str, ...] = ()
    normalize = False
    dense: list[DenseSpec] = []
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = {} if module.get("_default") else _read_json(model_dir / module["path"] / "config.json")
            pooling = _pooling_modes(config or {"pooling_mode": "mean"})
        elif kind == "Normalize":
            normalize = True
        elif kind == "Dense" and pooling and not normalize:
            dense.append(_dense(model_dir, str(module.get("path", ""))))
        elif kind != "Transformer":
            raise ValueError(f"module {module.get('type')} in {model_dir / 'modules.json'} is not supported "
                             "(supported: Transformer, Pooling, Dense after pooling, Normalize)")
    sbert = _read_json(model_dir / "sentence_bert_config.json")
    max_len = sbert.get("max_seq_length") or _default_max_length(model_dir)
    prompts, default_prompt = _prompts(model_dir)
    side = _read_json(model_dir / "tokenizer_config.json").get("padding_side")
    return SentenceConfig(int(max_len), pooling or ("mean",), normalize, bool(sbert.get("do_lower_case")),
                          tuple(dense), prompts, default_prompt, _matryoshka(model_dir),
                          side if side in ("left", "right") else "right")


# model_type -> (pooling, Dense layers of the model's own, as width multipliers) for folders without
# modules.json (some mlx conversions ship only the transformer): what Qwen3-Embedding and EmbeddingGemma run
_ARCHITECTURE_DEFAULTS: dict[str, tuple[str, tuple[tuple[int, int], ...]]] = {
    "qwen3": ("lasttoken", ()),
    "gemma3_text": ("mean", ((1, 4), (4, 1))),
}


def _architecture_default(model_dir: Path, pooling: str, dense: tuple[tuple[int, int], ...]) -> SentenceConfig:
    hidden = int(_read_json(model_dir / "config.json").get("hidden_size", 0))
    specs = tuple(DenseSpec("", a * hidden, b * hidden, False, "Identity") for a, b in dense)  # path "": the model's
    prompts, default_prompt = _prompts(model_dir)
    side = _read_json(model_dir / "tokenizer_config.json").get("padding_side")
    sbert = _read_json(model_dir / "sentence_bert_config.json")
    return SentenceConfig(int(sbert.get("max_seq_length") or _default_max_length(model_dir)), (pooling,), True,
                          False, specs, prompts, default_prompt, _matryoshka(model_dir),
                          side if side in ("left", "right") else "right")


def describe(config: SentenceConfig) -> dict[str, Any]:
    """The config as ``info`` shows it (JSON/msgpack types only)."""
    return {"pooling": "+".join(config.pooling), "dense": [f"{d.in_features}->{d.out_features} {d.activation}"
                                                           for d in config.dense],
            "normalize": config.normalize, "prompts": dict(config.prompts),
            "default_prompt_name": config.default_prompt_name, "matryoshka_dims": list(config.matryoshka_dims),
            "padding_side": config.padding_side}


def _default_max_length(model_dir: Path) -> int:
    candidates = [_read_json(model_dir / "config.json").get("max_position_embeddings"),
                  _read_json(model_dir / "tokenizer_config.json").get("model_max_length")]
    usable = [int(c) for c in candidates if isinstance(c, (int, float)) and 0 < c < 1_000_000]
    return min(usable) if usable else 512


def load_tokenizer(model_dir: Path, max_seq_length: int | None, direction: str = "right"):
    """``tokenizer.json`` with truncation at ``max_seq_length`` (None: none) from ``direction``, no padding.

    The file's own padding/truncation settings are dropped: all-MiniLM-L6-v2's pads to a fixed 128
    and truncates at 128, which would not match sentence-transformers (256, pad to longest).
    ``direction="left"`` drops the first tokens instead of the last (special tokens stay).
    """
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (a fast-tokenizer file is required)")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    if max_seq_length is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_length=max_seq_length, direction=direction)
    return tokenizer


def pad_id(tokenizer, model_dir: Path) -> int:  # tokenizer: tokenizers.Tokenizer
    """The padding token id (from tokenizer.json's padding block, the special tokens, or [PAD])."""
    padding = _read_json(model_dir / "tokenizer.json").get("padding") or {}
    if isinstance(padding.get("pad_id"), int):
        return int(padding["pad_id"])
    declared = [_read_json(model_dir / name).get("pad_token")
                for name in ("special_tokens_map.json", "tokenizer_config.json")]
    tokens = [t.get("content") if isinstance(t, dict) else t for t in declared]
    for candidate in (*tokens, "[PAD]", "<pad>"):
        if candidate and tokenizer.token_to_id(candidate) is not None:
            return int(tokenizer.token_to_id(candidate))
    return 0


def pool(hidden, mask, modes: tuple[str, ...], normalize: bool):  # numpy in, float32 numpy out
    """Sentence vectors from token states ``hidden`` (n, L, d) and ``mask`` (n, L), vectorized."""
    import numpy as np

    maskf = mask.astype(np.float32, copy=False)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "lasttoken":  # the last real token of each row, whichever side the padding is on
            last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)
            parts.append(hidden[np.arange(hidden.shape[0]), last])
        elif mode == "max":
            parts.append(np.where(maskf[:, :, None] > 0, hidden, -np.inf).max(axis=1))
        else:  # mean, mean_sqrt_len_tokens
            summed = np.matmul(maskf[:, None, :], hidden)[:, 0]
            counts = np.maximum(maskf.sum(axis=1, keepdims=True), 1e-9)
            parts.append(summed / (counts if mode == "mean" else np.sqrt(counts)))
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(out, dtype=np.float32)


def pad_batch(encodings: list, pad: int, dtype: str = "int64"):  # -> (ids, mask, type_ids, cut)
    """Stack tokenizer encodings into arrays padded to the longest one; ``cut[i]``: text i was truncated."""
    import numpy as np

    n, width = len(encodings), max(len(e.ids) for e in encodings)
    ids = np.full((n, width), pad, dtype=dtype)
    mask = np.zeros((n, width), dtype=dtype)
    types = np.zeros((n, width), dtype=dtype)
    cut = [False] * n
    for i, enc in enumerate(encodings):
        length = len(enc.ids)
        ids[i, :length] = enc.ids
        mask[i, :length] = 1
        types[i, :length] = enc.type_ids
        cut[i] = bool(enc.overflowing)
    return ids, mask, types, cut


_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*/*.safetensors", "*/*.bin")


def weights_revision(model_dir: Path, cache_dir: str | None = None) -> str:
    """A short hash of the weights' files (names and bytes), so two servers can tell they run the same model.

    Memoized per (file, size, mtime) under the model cache (``.revisions/``), never in the model's own
    directory, so a large model is hashed once.
    """
    import hashlib

    from akidb_embed.models.cache import cache_root

    files = sorted({p for pattern in _WEIGHT_PATTERNS for p in model_dir.glob(pattern) if p.is_file()})
    stamp = [[str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo_path = cache_root(cache_dir) / ".revisions" / (hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()
                                                        + ".json")
    memo = _read_json(memo_path) if memo_path.is_file() else {}
    if memo.get("stamp") == stamp and isinstance(memo.get("revision"), str):
        return memo["revision"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(model_dir)).encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    revision = digest.hexdigest()[:16]
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "revision": revision}))
        os.replace(tmp, memo_path)
    except OSError:
        pass
    return revision
