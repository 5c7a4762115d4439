"""Atomic checkpoint writes: a failure leaves no partial directory and never touches an existing one."""

import errno
import os
import subprocess
import sys

import pytest
from ckpt_helpers import compressed

from lowrank_kit import checkpoint
from lowrank_kit.checkpoint import atomic_directory, save_compressed
from lowrank_kit.errors import CheckpointError


@pytest.fixture(scope="module")
def result():
    return compressed("llava", "svd")


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def full_disk(*args, **kwargs):
    """A save that runs out of space half way: part of the file exists, then ENOSPC."""
    path = args[1]
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_a_full_disk_leaves_nothing_behind(result, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_model", full_disk)
    with pytest.raises(
        CheckpointError, match="no space left on the device .* nothing was written .* free space"
    ):
        save_compressed(result, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_does_not_touch_an_existing_checkpoint(result, tmp_path, monkeypatch):
    existing = save_compressed(result, tmp_path / "ckpt")
    before = snapshot(existing)
    monkeypatch.setattr(checkpoint, "save_model", full_disk)
    with pytest.raises(CheckpointError, match="no space left on the device"):
        save_compressed(result, existing, overwrite=True)
    assert snapshot(existing) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_an_interrupt_leaves_nothing_behind(result, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_compressed(result, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_needs_overwrite(result, tmp_path):
    existing = save_compressed(result, tmp_path / "ckpt")
    before = snapshot(existing)
    with pytest.raises(CheckpointError, match="already exists; choose another --output or pass --overwrite"):
        save_compressed(result, existing)
    assert snapshot(existing) == before


def test_overwrite_replaces_the_checkpoint(tmp_path):
    first = save_compressed(compressed("llava", "svd", ratio=0.8), tmp_path / "ckpt")
    old_weights = (first / "model.safetensors").read_bytes()
    save_compressed(compressed("llava", "svd", ratio=0.4), first, overwrite=True)
    assert (first / "model.safetensors").read_bytes() != old_weights
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_output_that_is_a_file_or_under_a_file(result, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        save_compressed(result, tmp_path / "file", overwrite=True)
    with pytest.raises(CheckpointError, match="'.*file' is a file, not a directory"):
        save_compressed(result, tmp_path / "file" / "sub" / "ckpt")


def test_missing_parent_directories_are_created(result, tmp_path):
    out = save_compressed(result, tmp_path / "a" / "b" / "ckpt")
    assert (out / "model.safetensors").is_file()
    assert out == tmp_path / "a" / "b" / "ckpt"


def test_a_failed_write_removes_the_parents_it_created(result, tmp_path, monkeypatch):
    import lowrank_kit.checkpoint as ckpt

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(ckpt, "_fsync", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        save_compressed(result, tmp_path / "a" / "b" / "ckpt")
    assert list(tmp_path.iterdir()) == []


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_leftovers_of_a_killed_writer_are_cleaned_up(tmp_path):
    target = tmp_path / "ckpt"
    pid = dead_pid()
    partial = tmp_path / f".ckpt.partial-{pid}-0123abcd"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    # Killed between moving the previous checkpoint aside and moving the new one in.
    old = tmp_path / f".ckpt.old-{pid}-89abcdef"
    old.mkdir()
    (old / "config.json").write_text("{}")
    unrelated = tmp_path / f".other.partial-{pid}-0123abcd"
    unrelated.mkdir()
    with atomic_directory(target, overwrite=True) as tmp:
        assert not partial.exists()
        assert (target / "config.json").read_text() == "{}"  # the previous checkpoint is back
        (tmp / "config.json").write_text('{"new": true}')
    assert (target / "config.json").read_text() == '{"new": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", unrelated.name])


def test_a_live_writers_directory_is_left_alone(tmp_path):
    live = tmp_path / f".ckpt.partial-{os.getpid()}-0123abcd"
    live.mkdir()
    with atomic_directory(tmp_path / "ckpt", overwrite=False) as tmp:
        (tmp / "a").write_text("a")
    assert live.exists()
