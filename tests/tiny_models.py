"""Tiny models of the real architectures, built by the test suite (random seeded weights, no hub).

* ``qwen3``: transformers' Qwen3 (decoder, causal attention), last-token pooling, the tokenizer padding
  on the left as Qwen3-Embedding's does, an instruction prompt, Normalize.
* ``gemma3``: transformers' Gemma3 text model with bidirectional attention and a short sliding window
  (so the sliding layers matter), mean pooling, two Dense layers (hidden -> 4*hidden -> hidden, no
  bias, as EmbeddingGemma), Normalize, ``query``/``document`` prompts, Matryoshka dims in config.json.
* ``minilm-cls``: all-MiniLM-L6-v2's files with CLS pooling instead of mean.

Each is a sentence-transformers folder written by sentence-transformers itself; all reuse the
all-MiniLM-L6-v2 WordPiece tokenizer. Hidden size 64 keeps them small and divisible by MLX's
quantization group size. Folders are cached under ``.cache/tiny-models/<name>-<recipe hash>`` so
cached ONNX exports survive between sessions; a change of the recipe below builds new ones.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

from akidb_embed import models

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
HIDDEN = 64
QWEN_PROMPTS = {"query": "Instruct: Given a web search query, retrieve relevant passages\nQuery: "}
GEMMA_PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}
GEMMA_MATRYOSHKA = [64, 32, 16]
GEMMA_SLIDING_WINDOW = 8
MAX_SEQ_LENGTH = 48


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(models.packaged_model_dir(MINILM)))


def _save(modules: list, out: Path, prompts: dict[str, str]) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(modules=modules, prompts=prompts, device="cpu")
    st.save(str(out))


def _flat_rope(hf: Path) -> None:
    """Write the RoPE bases also as the flat keys hub configs carry (``rope_theta``,
    ``rope_local_base_freq``), which mlx-lm/mlx-embeddings read; transformers 5 writes only ``rope_parameters``."""
    config = json.loads((hf / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if "full_attention" in rope:
        config["rope_theta"] = rope["full_attention"]["rope_theta"]
        config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    (hf / "config.json").write_text(json.dumps(config, indent=2))


def _qwen3(out: Path) -> None:
    import torch
    from sentence_transformers import models as stm
    from transformers import Qwen3Config, Qwen3Model

    tok = _tokenizer()
    torch.manual_seed(13)
    cfg = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    hf = out.parent / (out.name + ".hf")
    Qwen3Model(cfg).eval().save_pretrained(hf)
    tok.padding_side = "left"
    tok.save_pretrained(hf)
    transformer = stm.Transformer(str(hf), max_seq_length=MAX_SEQ_LENGTH)
    _save([transformer, stm.Pooling(HIDDEN, pooling_mode="lasttoken"), stm.Normalize()], out, QWEN_PROMPTS)
    _flat_rope(out)
    shutil.rmtree(hf)


def _gemma3(out: Path) -> None:
    import torch
    from sentence_transformers import models as stm
    from transformers import Gemma3TextConfig, Gemma3TextModel

    tok = _tokenizer()
    torch.manual_seed(31)
    cfg = Gemma3TextConfig(vocab_size=tok.vocab_size, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                           max_position_embeddings=512, sliding_window=GEMMA_SLIDING_WINDOW,
                           layer_types=["sliding_attention", "full_attention"], use_bidirectional_attention=True,
                           pad_token_id=tok.pad_token_id, query_pre_attn_scalar=32)
    model = Gemma3TextModel(cfg).eval()
    with torch.no_grad():  # random norms around 1 so the tiny model is not dominated by one layer
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    hf = out.parent / (out.name + ".hf")
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    config = json.loads((hf / "config.json").read_text())
    config.update(matryoshka_dimensions=GEMMA_MATRYOSHKA, sliding_window_pattern=2)
    (hf / "config.json").write_text(json.dumps(config, indent=2))
    transformer = stm.Transformer(str(hf), max_seq_length=MAX_SEQ_LENGTH)
    identity = torch.nn.Identity()
    dense = [stm.Dense(HIDDEN, 4 * HIDDEN, bias=False, activation_function=identity),
             stm.Dense(4 * HIDDEN, HIDDEN, bias=False, activation_function=identity)]
    _save([transformer, stm.Pooling(HIDDEN, pooling_mode="mean"), *dense, stm.Normalize()], out, GEMMA_PROMPTS)
    _flat_rope(out)
    shutil.rmtree(hf)


def _minilm_cls(out: Path) -> None:
    src = models.packaged_model_dir(MINILM)
    out.mkdir()
    for path in src.iterdir():
        if path.name not in ("1_Pooling", "onnx", "modules.json") and not path.name.startswith("."):
            (out / path.name).symlink_to(path)
    modules = json.loads((src / "modules.json").read_text())
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir()
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text())
    pooling = {k: v for k, v in pooling.items() if not k.startswith("pooling_mode")}
    pooling["pooling_mode_cls_token"] = True
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))


BUILDERS = {"qwen3": _qwen3, "gemma3": _gemma3, "minilm-cls": _minilm_cls}


def tiny_model(name: str, root: Path) -> Path:
    """The folder of tiny model ``name`` under ``root``, built once (atomically: temp dir, rename)."""
    builder = BUILDERS[name]
    recipe = inspect.getsource(builder) + inspect.getsource(_flat_rope) + repr((HIDDEN, QWEN_PROMPTS, GEMMA_PROMPTS, GEMMA_MATRYOSHKA,
                                                GEMMA_SLIDING_WINDOW, MAX_SEQ_LENGTH))
    digest = hashlib.sha1(recipe.encode()).hexdigest()[:8]
    out = root / f"{name}-{digest}"
    if out.is_dir():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        builder(tmp / "model")
        os.rename(tmp / "model", out)
    except OSError:
        if not out.is_dir():  # another session finished first: theirs is as good as ours
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
