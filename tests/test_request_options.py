"""The embed request's prompt / dimensions / truncate fields: decoding, config, and the mock through a real
supervisor (the model backends are covered by test_seed_models.py)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import raw_dealer, recv_answer

from akidb_embed import EmbedError
from akidb_embed.protocol.codec import pack
from akidb_embed.protocol.messages import RequestError, parse_request
from akidb_embed.supervisor.config import ConfigError, build_config
from akidb_embed.workers.backends.mock import mock_vector


def embed_frame(**fields) -> bytes:
    return pack({"v": 1, "id": 7, "op": "embed", "texts": ["a"], **fields})


def test_new_fields_decoded_with_defaults() -> None:
    req = parse_request(embed_frame())
    assert (req.prompt_name, req.prompt, req.dimensions, req.truncate) == (None, None, None, "end")
    req = parse_request(embed_frame(prompt_name="query", dimensions=32, truncate="none"))
    assert (req.prompt_name, req.dimensions, req.truncate) == ("query", 32, "none")
    assert parse_request(embed_frame(prompt="", truncate=None)).prompt == ""


@pytest.mark.parametrize("fields, needle", [
    ({"prompt_name": 3}, "'prompt_name' must be str"),
    ({"prompt": "a", "prompt_name": "b"}, "not both"),
    ({"prompt": "x" * 5000}, "longer than 4096"),
    ({"dimensions": 0}, "positive"),
    ({"dimensions": True}, "'dimensions' must be int"),
    ({"dimensions": 1.5}, "'dimensions' must be int"),
    ({"truncate": "middle"}, "end, start, none"),
])
def test_bad_fields_are_bad_requests(fields: dict, needle: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_request(embed_frame(**fields))
    assert needle in err.value.message and err.value.request_id == 7


def test_models_table_reaches_model_backends_only() -> None:
    cfg = build_config({"models": {"cache_max_gb": 2.5, "aliases": {"tiny": "/srv/tiny"}},
                        "backends": {"o": {"kind": "onnx", "model": "tiny", "allow_any_dimensions": True},
                                     "m": {"kind": "mock", "matryoshka_dimensions": [8]}}}, "t.toml", env={})
    assert cfg.backends["o"].options == {"allow_any_dimensions": True, "aliases": {"tiny": "/srv/tiny"},
                                         "cache_max_gb": 2.5}
    assert cfg.backends["m"].options == {"matryoshka_dimensions": [8]}
    for bad in ({"aliases": {"x": 1}}, {"cache_max_gb": -1}, {"cache_max_gb_typo": 1}):
        with pytest.raises(ConfigError, match="models"):
            build_config({"models": bad}, "t.toml", env={})


MOCK = """
[backends.m]
kind = "mock"
dim = 16
max_tokens = 4
matryoshka_dimensions = [8, 4]

[backends.any]
kind = "mock"
dim = 16
allow_any_dimensions = true

[backends.split]
kind = "mock"
dim = 16
max_tokens = 5
part_tokens = 8
"""


@pytest.fixture(scope="module")
def mock_server(tmp_path_factory):
    from conftest import running_server
    with running_server(tmp_path_factory.mktemp("opts"), MOCK) as server:
        yield server


def test_mock_prompt_dimensions_truncate(mock_server) -> None:
    texts = ["one two", "a b c d e f"]           # the second has 6 mock tokens (words), max_tokens = 4
    with mock_server.client(timeout=10) as c:
        r = c.embed_result(texts, backend="m", prompt="x ", dimensions=8, normalize=False)
        assert r.vectors.shape == (2, 8) and r.tokens == [3, 4] and r.truncated_rows == [False, True]
        assert r.truncated == 1
        np.testing.assert_allclose(r.vectors[0], mock_vector("x one two", 16)[:8])
        np.testing.assert_allclose(r.vectors[1], mock_vector("x a b c", 16)[:8])
        start = c.embed(texts[1:], backend="m", truncate="start", normalize=False)
        np.testing.assert_allclose(start[0], mock_vector("c d e f", 16))   # the last 4 words kept
        unit = c.embed(texts, backend="m", dimensions=4)
        np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
        with pytest.raises(EmbedError) as err:
            c.embed(texts, backend="m", truncate="none")
        assert err.value.code.value == "INPUT_TOO_LONG" and "texts[1] has 6 tokens" in err.value.message
        with pytest.raises(EmbedError) as err:
            c.embed(texts, backend="m", dimensions=5)
        assert err.value.code.value == "BAD_REQUEST" and "[8, 4]" in err.value.message
        with pytest.raises(EmbedError) as err:
            c.embed(texts, backend="m", prompt_name="query")
        assert err.value.code.value == "BAD_REQUEST" and "prompts: none" in err.value.message
        assert c.embed(texts, backend="any", dimensions=5).shape == (2, 5)
        assert c.info()["backends"]["m"]["extra"]["matryoshka_dims"] == [8, 4]   # the setting, as requests see it
        with pytest.raises(EmbedError, match="dimensions=17"):
            c.embed(texts, backend="any", dimensions=17)


def test_bad_option_answers_only_its_request(mock_server) -> None:
    """Requests batched together: the refused one gets its error, the others their vectors."""
    sock = raw_dealer(mock_server.endpoint)
    try:
        frames = [pack({"v": 1, "id": i, "op": "embed", "backend": "m", "texts": ["a b c d e f g"],
                        "truncate": "none" if i == 1 else "end"}) for i in range(3)]
        for frame in frames:
            sock.send(frame)
        answers = {a["id"]: a for a in (recv_answer(sock) for _ in frames)}
    finally:
        sock.close(0)
    assert answers[1]["error"]["code"] == "INPUT_TOO_LONG"
    assert answers[0]["ok"] and answers[2]["ok"] and answers[0]["tokens"] == [4]
    assert answers[0]["truncated_rows"] == [True] and answers[0]["truncated"] == 1


def test_folder_without_modules_json_gets_its_architecture_pipeline(tmp_path) -> None:
    """Conversions that ship only the transformer: Qwen3 pools the last token, Gemma3 uses its own Dense."""
    import json

    from akidb_embed import models

    for model_type, pooling, dense in (("qwen3", ("lasttoken",), ()), ("gemma3_text", ("mean",), (64, 256))):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 64,
                                                        "max_position_embeddings": 2048}))
        config = models.read_sentence_config(folder)
        assert config.pooling == pooling and config.normalize and config.max_seq_length == 2048
        assert tuple(d.in_features for d in config.dense[:1]) + tuple(d.out_features for d in config.dense[:1]) == dense
        assert not models.pipeline.dense_weights_present(folder, config) or not dense


def test_cli_embed_passes_the_options(mock_server) -> None:
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "akidb_embed.cli", "embed", "--endpoint", mock_server.endpoint, "--backend", "m",
           "--prompt", "x ", "--dimensions", "8", "--truncate", "start", "--no-normalize", "--json", "a b c d e f"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    doc = json.loads(out)
    assert doc["tokens"] == [4] and doc["truncated_rows"] == [True] and doc["truncated"] == 1
    np.testing.assert_allclose(doc["embeddings"][0], mock_vector("c d e f", 16)[:8], rtol=1e-6)
    bad = subprocess.run(cmd[:-2] + ["--truncate", "none", "a b c d e f"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "INPUT_TOO_LONG" in bad.stderr


def test_split_request_answers_tokens_and_truncated_rows_in_order(mock_server) -> None:
    from akidb_embed.supervisor.jobs import part_bounds
    from akidb_embed.supervisor.passes import estimate_tokens

    texts = [" ".join(f"w{i}x{j}" for j in range(1 + (i * 7) % 11)) for i in range(24)]   # 1..11 mock tokens
    assert len(part_bounds([estimate_tokens(t) for t in texts], 8)) > 1   # the supervisor cuts it into parts
    with mock_server.client(timeout=30) as c:
        r = c.embed_result(texts, backend="split", normalize=False)
    words = [len(t.split()) for t in texts]
    assert r.tokens == [min(n, 5) for n in words]
    assert r.truncated_rows == [n > 5 for n in words] and r.truncated == sum(n > 5 for n in words)
    for text, row in zip(texts, r.vectors):   # each row is its own text's vector, cut at the end
        np.testing.assert_allclose(row, mock_vector(" ".join(text.split()[:5]), 16), rtol=1e-6)
