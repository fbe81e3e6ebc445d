"""Models: where they come from (``cache``), how their ONNX graph is quantized (``quantize``), and what a
sentence-transformers model directory says about itself (``sentence``)."""
from akidb_embed.models.cache import (
    DOWNLOAD_IGNORE, MARKER, NAME_ALIASES, PACKAGED_MODELS, ModelEntry, ModelNotFound, cache_dir, cache_root,
    canonical_name,
    check_entry, entry_dirname, list_models, onnx_path, packaged_model_dir, pull, read_marker, remove,
    resolve_model, write_marker,
)
from akidb_embed.models.quantize import INT8_RECIPE
from akidb_embed.models.sentence import (
    POOLING_MODES, SentenceConfig, load_tokenizer, pad_batch, pad_id, pool, read_sentence_config,
)

__all__ = [
    "DOWNLOAD_IGNORE", "INT8_RECIPE", "MARKER", "NAME_ALIASES", "PACKAGED_MODELS", "POOLING_MODES", "ModelEntry",
    "ModelNotFound", "SentenceConfig", "cache_dir", "cache_root", "canonical_name", "check_entry", "entry_dirname",
    "list_models", "load_tokenizer", "onnx_path", "pad_batch", "packaged_model_dir", "pad_id", "pool", "pull", "read_marker",
    "read_sentence_config", "remove", "resolve_model", "write_marker",
]
