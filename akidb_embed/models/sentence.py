"""What a sentence-transformers model directory says about itself: max length, pooling, normalization,
and the tokenizer set up to match (pad to the longest text, truncate at max_seq_length). Shared by the
onnx and mlx backends and the quantizer; ``tokenizers`` and ``numpy`` are imported only inside."""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple



POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean",
                        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens"}


class SentenceConfig(NamedTuple):
    """The pipeline sentence-transformers would run after the transformer, from ``modules.json``."""

    max_seq_length: int
    pooling: tuple[str, ...]   # concatenated in this order, as sentence-transformers does
    normalize: bool            # a Normalize module follows pooling
    do_lower_case: bool


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
        extra = [k for k in ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken") if config.get(k)]
        if extra:
            raise ValueError(f"pooling {extra} is not supported (supported: {POOLING_MODES})")
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ValueError(f"pooling {bad or 'none'} is not supported (supported: {POOLING_MODES})")
    return modes


def read_sentence_config(model_dir: Path) -> SentenceConfig:
    """Pooling, normalization and max length from ``modules.json`` and friends.

    Without ``modules.json`` (a plain transformers model) this is mean pooling, no normalization.
    Raises ValueError for modules this package can't reproduce (Dense, weighted-mean pooling...).
    """
    modules = _read_json(model_dir / "modules.json") or [
        {"type": "sentence_transformers.models.Transformer", "path": ""},
        {"type": "sentence_transformers.models.Pooling", "path": "", "_default": True}]
    pooling: tuple[str, ...] = ()
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = {} if module.get("_default") else _read_json(model_dir / module["path"] / "config.json")
            pooling = _pooling_modes(config or {"pooling_mode": "mean"})
        elif kind == "Normalize":
            normalize = True
        elif kind != "Transformer":
            raise ValueError(f"module {module.get('type')} in {model_dir / 'modules.json'} is not supported")
    sbert = _read_json(model_dir / "sentence_bert_config.json")
    max_len = sbert.get("max_seq_length") or _default_max_length(model_dir)
    return SentenceConfig(int(max_len), pooling or ("mean",), normalize, bool(sbert.get("do_lower_case")))


def _default_max_length(model_dir: Path) -> int:
    candidates = [_read_json(model_dir / "config.json").get("max_position_embeddings"),
                  _read_json(model_dir / "tokenizer_config.json").get("model_max_length")]
    usable = [int(c) for c in candidates if isinstance(c, (int, float)) and 0 < c < 1_000_000]
    return min(usable) if usable else 512


def load_tokenizer(model_dir: Path, max_seq_length: int):  # -> tokenizers.Tokenizer
    """``tokenizer.json`` with truncation at ``max_seq_length`` and no padding.

    The file's own padding/truncation settings are dropped: all-MiniLM-L6-v2's pads to a fixed 128
    and truncates at 128, which would not match sentence-transformers (256, pad to longest).
    """
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (a fast-tokenizer file is required)")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_length)
    return tokenizer


def pad_id(tokenizer, model_dir: Path) -> int:  # tokenizer: tokenizers.Tokenizer
    """The padding token id (from tokenizer.json's padding block, the special tokens, or [PAD])."""
    padding = _read_json(model_dir / "tokenizer.json").get("padding") or {}
    if isinstance(padding.get("pad_id"), int):
        return int(padding["pad_id"])
    special = _read_json(model_dir / "special_tokens_map.json").get("pad_token")
    token = special.get("content") if isinstance(special, dict) else special
    for candidate in (token, "[PAD]", "<pad>"):
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
