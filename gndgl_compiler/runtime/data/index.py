"""Streamed sources: list an image folder, a ``.tar``/``.tar.gz`` or WebDataset-style shards once
into a :class:`SourceIndex` (sample references and labels, no pixels), from which worker
processes read one sample's bytes at a time.

    folder  train|val|test/<class>/<image>     ──▶ paths
    .tar    the same layout inside             ──▶ (offset, size) of each member, read by seeking
    .tar.gz the same layout inside             ──▶ the encoded bytes held once (gzip cannot seek)
    shards  prefix-{000..099}.tar: <key>.jpg + <key>.cls ──▶ (shard, offset, size) per sample

Samples are sorted as the in-memory path sorts them (class, then file name), so sample ``i``
is the same image on both paths and the batches agree.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ...errors import DataError
from .folder import IMAGE_EXTS, check_archive
from ..run.progress import ProgressEvent

TRAIN_NAMES, EVAL_NAMES = ("train",), ("test", "val")  # test/ first, as the in-memory path
_LAYOUT = ("a data set path is a folder holding train/<class>/* and val/<class>/* (or test/<class>/*), optionally "
           "inside one top-level folder; a .tar/.tar.gz of that; or WebDataset shards 'name-{000..009}.tar' of "
           "<key>.jpg + <key>.cls")


@dataclass
class Split:
    """One split's samples: a reference per sample and its label."""

    refs: list[Any]
    """folder: path; tar: (offset, size); targz: (offset, size) into the blob; shards: (shard, offset, size)."""
    labels: torch.Tensor
    names: list[str] = field(default_factory=list)
    """Where each sample is, for messages (path, or member in archive)."""
    pixels: torch.Tensor | None = None
    """kind ``tensor``: the decoded images (refs index them)."""

    def select(self, idx: torch.Tensor) -> "Split":
        """The samples at ``idx``, in that order."""
        ii = idx.tolist()
        return Split([self.refs[i] for i in ii], self.labels[idx].clone(), [self.names[i] for i in ii], self.pixels)


@dataclass
class SourceIndex:
    """A streamed data set: its kind (folder, tar, targz, shards, tensor), classes and the two splits;
    :meth:`read` gives a sample's bytes."""

    kind: str
    root: Path
    classes: list[str]
    train: Split
    test: Split
    files: list[str] = field(default_factory=list)
    """shards: the shard paths (refs hold an index into this)."""
    blob: np.ndarray | None = None
    """targz: every sample's encoded bytes, concatenated."""
    _handles: dict = field(default_factory=dict, repr=False)

    def read(self, ref: Any) -> bytes:
        """The encoded bytes of the sample ``ref`` (opens files lazily, once per process)."""
        if self.kind == "folder":
            with open(ref, "rb") as f:
                return f.read()
        if self.kind != "tar" and len(ref) == 2:  # targz, or a .tar.gz shard: held encoded in ``blob``
            return self.blob[ref[0]:ref[0] + ref[1]].tobytes()
        path = str(self.root) if self.kind == "tar" else self.files[ref[0]]
        off, size = ref[-2], ref[-1]
        key = (os.getpid(), path)
        f = self._handles.get(key)
        if f is None:
            f = self._handles[key] = open(path, "rb")
        f.seek(off)
        return f.read(size)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles stay in the process that opened them
        return state


def index_source(path: str | os.PathLike, progress: Callable[[Any], None] | None = None) -> SourceIndex:
    """List a folder, ``.tar``/``.tar.gz`` or brace pattern of shards into a :class:`SourceIndex`.

    Raises:
        DataError: a path that is not there, no images, one class, train and eval classes that differ,
            a shard sample without its label; each names the path and what to do.
    """
    given = str(path)
    if "{" in given:
        from .shards import index_shards
        return index_shards(given, progress)
    p = Path(os.path.expanduser(given)).resolve()
    if not p.exists():
        raise DataError(f"data set path '{given}' does not exist; {_LAYOUT}")
    if not p.is_dir():
        check_archive(p, given)  # a single image, a zip, a damaged file: one line, as the in-memory path says
    if p.is_dir():
        rows, kind, blob = _list_folder(p, progress), "folder", None
    elif _is_gz(p):
        rows, blob = _list_targz(p, progress)
        kind = "targz"
    else:
        rows, kind, blob = _list_tar(p, progress), "tar", None
    return _build(p, kind, rows, blob)


def _is_gz(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _keep(rel: str) -> tuple[tuple, str, str, str] | None:
    """(prefix, split, class, file) of an image path in the layout, else None."""
    parts = [s for s in rel.split("/") if s not in ("", ".")]
    if (len(parts) < 3 or len(parts) > 4 or parts[-3] not in TRAIN_NAMES + EVAL_NAMES
            or any(s.startswith(".") for s in parts) or Path(parts[-1]).suffix.lower() not in IMAGE_EXTS):
        return None
    return tuple(parts[:-3]), parts[-3], parts[-2], parts[-1]


def _report(progress, done: int, total: int | None) -> None:
    if progress is not None and done % 4096 == 0:
        progress(ProgressEvent("data", done, total))


def _list_folder(p: Path, progress) -> list[tuple]:
    rows: list[tuple] = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(p).as_posix()
        for name in sorted(filenames):
            got = _keep(f"{rel_dir}/{name}")
            if got is not None:
                rows.append((*got, os.path.join(dirpath, name)))
                _report(progress, len(rows), None)
    return rows


def _open_tar(p: Path, mode: str) -> tarfile.TarFile:
    try:
        return tarfile.open(p, mode)
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"cannot read archive {p}: it is damaged or cut short ({e}); {_LAYOUT}") from None


def _list_tar(p: Path, progress) -> list[tuple]:
    rows: list[tuple] = []
    with _open_tar(p, "r:") as tf:
        try:
            for m in tf:
                got = _keep(m.name) if m.isfile() else None
                if got is not None:
                    rows.append((*got, (m.offset_data, m.size)))
                    _report(progress, len(rows), None)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot read archive {p}: it is damaged or cut short ({e}); {_LAYOUT}") from None
    return rows


def _list_targz(p: Path, progress) -> tuple[list[tuple], np.ndarray]:
    rows, chunks, off = [], [], 0
    with _open_tar(p, "r:gz") as tf:
        try:
            for m in tf:
                got = _keep(m.name) if m.isfile() else None
                if got is not None:
                    data = tf.extractfile(m).read()
                    chunks.append(np.frombuffer(data, np.uint8))
                    rows.append((*got, (off, len(data))))
                    off += len(data)
                    _report(progress, len(rows), None)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot read archive {p}: it is damaged or cut short ({e}); {_LAYOUT}") from None
    return rows, (np.concatenate(chunks) if chunks else np.zeros(0, np.uint8))


def _build(p: Path, kind: str, rows: list[tuple], blob) -> SourceIndex:
    prefixes = {r[0] for r in rows}
    if len(prefixes) > 1:
        tops = sorted("/".join(x) for x in prefixes)
        raise DataError(f"{p} holds image folders under several top-level folders {tops}; keep one. {_LAYOUT}")
    train = [r for r in rows if r[1] in TRAIN_NAMES]
    eval_name = next((n for n in EVAL_NAMES if any(r[1] == n for r in rows)), None)
    test = [r for r in rows if r[1] == eval_name]
    if not train or not test:
        missing = "train/<class>/<image>" if not train else "val/<class>/<image> (or test/)"
        raise DataError(f"{p} has no images under {missing}; {_LAYOUT}")
    classes = check_classes(sorted({r[2] for r in train}), sorted({r[2] for r in test}), str(p), eval_name)
    return SourceIndex(kind, p, classes, _split(train, classes, p, kind), _split(test, classes, p, kind), blob=blob)


def check_classes(train: list[str], test: list[str], where: str, eval_name: str = "val") -> list[str]:
    """The classes (sorted train class names), after checking there are two or more and the eval split's match."""
    if len(train) < 2:
        raise DataError(f"{where} has one class ({train[0]!r}) under train/; a classifier needs two or more "
                        "class folders (train/<class>/<image>)")
    extra, missing = sorted(set(test) - set(train)), sorted(set(train) - set(test))
    if extra or missing:
        what = "; ".join(s for s in (f"{eval_name}/ has classes not in train/: {extra[:5]}" if extra else "",
                                     f"train/ has classes not in {eval_name}/: {missing[:5]}" if missing else "") if s)
        raise DataError(f"{where}: the class lists of train/ and {eval_name}/ differ ({what}); give both splits the "
                        "same class folders (an empty folder is not a class)")
    return train


def _split(rows: list[tuple], classes: list[str], p: Path, kind: str) -> Split:
    index = {c: i for i, c in enumerate(classes)}
    rows = sorted(rows, key=lambda r: (index[r[2]], r[3]))
    names = [r[4] if kind == "folder" else f"{'/'.join(r[0] + (r[1], r[2], r[3]))} in {p}" for r in rows]
    return Split([r[4] for r in rows], torch.tensor([index[r[2]] for r in rows], dtype=torch.int64), names)
