"""Models: where they come from (``cache``), who uses them and the cache's size limit (``usage``), how their
ONNX graph is quantized (``quantize``), what a sentence-transformers model directory says about itself
(``sentence``), and the tokenize/pool/Dense/normalize steps around the transformer (``pipeline``)."""
from akidb_embed.models.cache import (
    DOWNLOAD_IGNORE, MARKER, NAME_ALIASES, PACKAGED_MODELS, ModelEntry, ModelNotFound, add_aliases, cache_dir,
    cache_root,
    canonical_name,
    check_entry, entry_dirname, list_models, onnx_path, packaged_model_dir, pull, read_marker, remove,
    resolve_model, write_marker,
)
from akidb_embed.models.pipeline import TRUNCATE_SIDES, Pipeline, TextEncoder
from akidb_embed.models.quantize import INT8_RECIPE
from akidb_embed.models.sentence import (
    POOLING_MODES, DenseSpec, SentenceConfig, describe, load_tokenizer, pad_batch, pad_id, pool,
    read_sentence_config, weights_revision,
)
from akidb_embed.models.usage import CacheEntry, Held, enforce_limit, entries, hold, prune

__all__ = [
    "DOWNLOAD_IGNORE", "INT8_RECIPE", "MARKER", "NAME_ALIASES", "PACKAGED_MODELS", "POOLING_MODES",
    "TRUNCATE_SIDES", "add_aliases", "CacheEntry", "DenseSpec", "Held", "ModelEntry", "ModelNotFound", "Pipeline",
    "SentenceConfig", "TextEncoder", "cache_dir", "cache_root", "canonical_name", "check_entry", "describe",
    "enforce_limit", "entries", "entry_dirname", "hold", "list_models", "load_tokenizer", "onnx_path",
    "pad_batch", "packaged_model_dir", "pad_id", "pool", "prune", "pull", "read_marker", "read_sentence_config",
    "remove", "resolve_model", "weights_revision", "write_marker",
]
