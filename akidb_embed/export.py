"""Export a Hugging Face transformer to ONNX: ``python -m akidb_embed.export MODEL_DIR OUT.onnx``.

The only module of the package that imports torch for ONNX; :func:`akidb_embed.models.onnx_path`
runs it in a subprocess so the onnx worker never does. The graph takes ``input_ids``,
``attention_mask`` and (when the model accepts it) ``token_type_ids``, int64 with dynamic batch and
sequence axes, and returns ``last_hidden_state``; pooling, Dense and normalization stay in the backend.
Works for BERT-style encoders, Qwen3 (causal decoder; inputs padded on the right) and Gemma3 text
models, whose per-layer-type masks (full, sliding window; bidirectional for EmbeddingGemma) are built
in the graph from the 2-D attention mask and passed precomputed, because transformers' own mask
construction does not trace (onnxruntime fails with ``unordered_map::at``). Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OPSET = 17
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _wrapped_model(model_dir: Path) -> tuple[Any, list[str]]:
    """The encoder wrapped for export, and the input names its forward takes."""
    import inspect

    import torch
    from transformers import AutoModel

    from transformers import AutoConfig

    # decoders and Gemma3 take precomputed additive masks through the eager attention; encoders keep their default
    model_type = getattr(AutoConfig.from_pretrained(str(model_dir)), "model_type", "")
    extra = {"attn_implementation": "eager"} if model_type in ("qwen3", "gemma3_text") else {}
    model = AutoModel.from_pretrained(str(model_dir), **extra)
    model.eval()
    accepted = inspect.signature(model.forward).parameters
    names = [n for n in INPUT_NAMES if n in accepted]  # DistilBERT-style models take no token_type_ids
    gemma3 = model_type == "gemma3_text"

    class LastHidden(torch.nn.Module):
        """Keyword-argument call with a tensor output, as the TorchScript exporter needs."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):  # type: ignore[no-untyped-def]
            kwargs = dict(zip(names, tensors))
            if gemma3:
                kwargs["attention_mask"] = gemma3_masks(kwargs["attention_mask"], self.inner.config)
            return self.inner(**kwargs).last_hidden_state

    return LastHidden(model).eval(), names


def gemma3_masks(mask: Any, config: Any) -> dict[str, Any]:
    """Additive 4-D masks (batch, 1, L, L) per Gemma3 layer type from a 2-D padding mask, as transformers
    builds them: keys must be real tokens; sliding layers see |q - k| < sliding_window (bidirectional) or
    0 <= q - k < sliding_window (causal); full layers see every real key (bidirectional) or k <= q."""
    import torch

    length = mask.shape[1]
    keys = mask[:, None, None, :].bool()
    pos = torch.arange(length, device=mask.device)
    offset = pos[:, None] - pos[None, :]
    window = int(config.sliding_window or 1 << 30)
    if getattr(config, "use_bidirectional_attention", False):
        full, sliding = keys, keys & (offset.abs() < window)
    else:
        full = keys & (offset >= 0)
        sliding = full & (offset < window)
    lowest = torch.finfo(torch.float32).min
    zero = torch.zeros((), dtype=torch.float32)
    return {"full_attention": torch.where(full, zero, lowest), "sliding_attention": torch.where(sliding, zero, lowest)}


def _sample_inputs(model_dir: Path) -> dict[str, Any]:
    import torch

    from akidb_embed.models import load_tokenizer, pad_id

    tok = load_tokenizer(model_dir, 128)
    tok.enable_padding(pad_id=pad_id(tok, model_dir))
    encs = tok.encode_batch(["Export check: the quick brown fox jumps over the lazy dog.", "short"])
    return {
        "input_ids": torch.tensor([e.ids for e in encs], dtype=torch.int64),
        "attention_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.int64),
        "token_type_ids": torch.tensor([e.type_ids for e in encs], dtype=torch.int64),
    }


def _verify(onnx_file: Path, wrapped: Any, inputs: dict[str, Any]) -> float:
    """Run the exported graph and the torch model on the same input; return the max abs difference."""
    import numpy as np
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    with torch.no_grad():  # the model's own forward (its own masks), not the wrapper that was exported
        expected = wrapped.inner(**{i.name: inputs[i.name] for i in sess.get_inputs()}).last_hidden_state.numpy()
    feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    got = sess.run(None, feed)[0]
    mask = inputs["attention_mask"].numpy()[..., None].astype(bool)
    return float(np.max(np.abs(np.where(mask, got - expected, 0.0))))


def export_onnx(model_dir: Path, out_path: Path, *, opset: int = OPSET) -> Path:
    """Export ``model_dir`` to ``out_path`` atomically (temp file, verify, then os.replace)."""
    import warnings

    import torch

    # The TorchScript exporter is deprecated and tracing warns about shape checks that are
    # constant for this graph; the verification below is what tells us the export is right.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message="Exporting aten::index")
    start = time.monotonic()
    _say(f"exporting {model_dir} to {out_path} (opset {opset})")
    wrapped, names = _wrapped_model(model_dir)
    inputs = _sample_inputs(model_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapped, tuple(inputs[n] for n in names),
                str(tmp), input_names=names, output_names=["last_hidden_state"],
                dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                              "last_hidden_state": {0: "batch", 1: "sequence"}},
                opset_version=opset, do_constant_folding=True, dynamo=False)
        diff = _verify(tmp, wrapped, inputs)
        if diff > 1e-3:
            raise RuntimeError(f"exported graph disagrees with torch (max abs diff {diff:.2e})")
        _say(f"verified against torch: max abs diff {diff:.2e}")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the export is a shared cache file
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    size_mb = out_path.stat().st_size / 1e6
    _say(f"wrote {out_path} ({size_mb:.1f} MB) in {time.monotonic() - start:.1f} s")
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m akidb_embed.export", description=__doc__)
    parser.add_argument("model_dir", type=Path, help="a local model directory (config.json + weights)")
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=OPSET)
    args = parser.parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        _say(f"error: {args.model_dir} has no config.json; pass a model directory")
        return 2
    try:
        export_onnx(args.model_dir, args.out, opset=args.opset)
    except Exception as exc:  # noqa: BLE001 - report any failure as one line plus exit code
        _say(f"error: export failed: {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
