"""fsio: atomic files and directories, hashes, JSON reading, and the FileSystem seam."""

from __future__ import annotations

import errno
import hashlib
import json

import pytest

from gndgl_compiler import fsio
from gndgl_compiler.errors import ArtifactError, RunError


class Recorder(fsio.FileSystem):
    def __init__(self):
        self.calls: list[str] = []

    def replace(self, src, dst):
        self.calls.append("replace")
        super().replace(src, dst)

    def fsync_dir(self, directory):
        self.calls.append("fsync_dir")
        super().fsync_dir(directory)

    def point(self, name, **info):
        self.calls.append(name)


def test_use_is_scoped_and_restores_the_real_file_system(tmp_path):
    real = fsio.current()
    rec = Recorder()
    with fsio.use(rec) as fs:
        assert fs is rec and fsio.current() is rec
        fsio.atomic_write_json(tmp_path / "a.json", {"x": 1})
        fsio.point("test.event", step=3)
    assert fsio.current() is real
    assert rec.calls == ["replace", "fsync_dir", "test.event"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_atomic_write_via_removes_its_temp_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "w.bin"
    fsio.atomic_write_bytes(target, b"old")

    def writer(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        fsio.atomic_write_via(target, writer, suffix=".pt2")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]
    fsio.atomic_write_via(target, lambda tmp: tmp.write_bytes(b"new"), suffix=".pt2")
    assert target.read_bytes() == b"new"


def test_failed_rename_leaves_the_old_file_and_no_temp(tmp_path):
    class NoRename(fsio.FileSystem):
        def replace(self, src, dst):
            raise OSError(errno.EACCES, "Permission denied")

    target = tmp_path / "f.txt"
    fsio.atomic_write_text(target, "old")
    with fsio.use(NoRename()), pytest.raises(RunError, match="Permission denied") as info:
        fsio.atomic_write_text(target, "new", error=RunError)
    assert str(target) in str(info.value)
    with fsio.use(NoRename()), pytest.raises(OSError):
        fsio.atomic_write_text(target, "new", error=None)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_dir_swaps_a_whole_tree(tmp_path, exchange):
    class FS(fsio.FileSystem):
        def exchange(self, a, b):
            return super().exchange(a, b) if exchange else False

    out = tmp_path / "DIR"
    with fsio.use(FS()):
        for content in ("old", "new"):
            with fsio.replacing_dir(out, error=ArtifactError, what="tree") as tmp:
                fsio.current().mkdir(tmp / "sub")
                fsio.write_file(tmp / "sub" / "f.txt", content)
    assert (out / "sub" / "f.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["DIR"]  # no temp or parked tree left


def test_replacing_dir_keeps_the_old_tree_when_the_body_fails(tmp_path):
    out = tmp_path / "DIR"
    with fsio.replacing_dir(out) as tmp:
        fsio.write_file(tmp / "f.txt", "old")
    with pytest.raises(ValueError), fsio.replacing_dir(out) as tmp:
        fsio.write_file(tmp / "f.txt", "new")
        raise ValueError("interrupted")
    assert (out / "f.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["DIR"]


def test_interrupted_replacement_finds_the_parked_tree(tmp_path):
    parked = tmp_path / ".DIR.old-x1" / "a"
    parked.mkdir(parents=True)
    assert fsio.interrupted_replacement(tmp_path / "DIR", "manifest.json") is None
    (parked / "manifest.json").write_text("{}")
    assert fsio.interrupted_replacement(tmp_path / "DIR", "manifest.json") == parked


def test_hashes_and_read_json(tmp_path):
    data = b"x" * (3 << 20) + b"tail"
    (tmp_path / "f").write_bytes(data)
    assert fsio.sha256_file(tmp_path / "f") == fsio.sha256_bytes(data) == hashlib.sha256(data).hexdigest()
    assert fsio.sha256_and_size(tmp_path / "f")[1] == len(data)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ArtifactError, match=r"bad\.json.*; restore it"):
        fsio.read_json(tmp_path / "bad.json", error=ArtifactError, remedy="restore it")
    with pytest.raises(RunError, match="missing.json"):
        fsio.read_json(tmp_path / "missing.json", error=RunError)


def test_remove_temp_files(tmp_path):
    (tmp_path / ".a.json.x1.tmp").write_text("")
    (tmp_path / "keep.json").write_text("")
    assert fsio.remove_temp_files(tmp_path) == [".a.json.x1.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]
