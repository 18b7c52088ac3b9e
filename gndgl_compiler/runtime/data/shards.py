"""WebDataset-style shards: tar files of ``<key>.jpg`` + ``<key>.cls`` (the class index as text),
named by a brace pattern, e.g. ``/data/in1k/{train-{0000..0146},val-{0000..0006}}.tar``.

Each shard is listed once with :mod:`tarfile` (an uncompressed shard is then read by seeking to a
sample's offset; a ``.tar.gz`` shard is held encoded in memory, gzip cannot seek), so a sample is
addressed by its index: the order and augmentation stay functions of (seed, epoch, index), which a
sequential shard reader (the ``webdataset`` library's iterator and shuffle buffer) cannot promise.
A shard belongs to the split its file name names: ``train``, else ``val`` or ``test``.
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ...errors import DataError
from .index import EVAL_NAMES, SourceIndex, Split, check_classes
from ..run.progress import ProgressEvent

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_HOW = "a shard pattern names tar files of <key>.jpg + <key>.cls, e.g. /data/{train-{000..009},val-{000..001}}.tar"


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``{a,b}`` alternatives and ``{000..009}`` zero-padded ranges, nested."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, parts, last = 0, [], start + 1
    for i in range(start, len(pattern)):
        ch = pattern[i]
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 1:
            parts.append(pattern[last:i])
            last = i + 1
        if depth == 0:
            parts.append(pattern[last:i])
            break
    else:
        raise DataError(f"shard pattern '{pattern}' has an unclosed '{{'; {_HOW}")
    head, tail = pattern[:start], pattern[i + 1:]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", parts[0]) if len(parts) == 1 else None
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        parts = [str(k).zfill(len(lo)) for k in range(int(lo), int(hi) + 1)]
    return [x for p in parts for x in expand_braces(head + p + tail)]


def _split_of(path: str) -> str | None:
    name = Path(path).name.lower()
    return next((s for s in ("train",) + EVAL_NAMES if s in name), None)


def index_shards(pattern: str, progress: Callable[[Any], None] | None = None) -> SourceIndex:
    """List every shard of ``pattern`` into a :class:`SourceIndex` (kind ``shards``).

    Raises:
        DataError: a missing shard, a shard of no split, a sample without its label, labels that are not
            class indices, fewer than two classes or eval labels unknown to train.
    """
    files = [os.path.expanduser(f) for f in expand_braces(pattern)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{len(missing)} of the {len(files)} shards of '{pattern}' do not exist (first: {missing[0]}); "
                        f"{_HOW}")
    rows: dict[str, list] = {"train": [], "eval": []}
    blobs: list[np.ndarray] = []
    offset = [0]
    for n, f in enumerate(files):
        split = _split_of(f)
        if split is None:
            raise DataError(f"shard {f} names no split; put 'train', 'val' or 'test' in each shard's file name")
        rows["train" if split == "train" else "eval"] += _list_shard(n, f, blobs, offset)
        if progress is not None:
            progress(ProgressEvent("data", n + 1, len(files)))
    if not rows["train"] or not rows["eval"]:
        raise DataError(f"'{pattern}' has no {'train' if not rows['train'] else 'val/test'} shards with samples; "
                        f"{_HOW}")
    labels = {k: [r[1] for r in v] for k, v in rows.items()}
    k = max(max(labels["train"]), max(labels["eval"])) + 1
    classes = [str(i) for i in range(k)]
    check_classes(sorted({str(i) for i in labels["train"]}), sorted({str(i) for i in labels["eval"]}), pattern)
    splits = [Split([r[2] for r in v], torch.tensor(labels[s], dtype=torch.int64), [r[0] for r in v])
              for s, v in rows.items()]
    return SourceIndex("shards", Path(files[0]).parent, classes, *splits, files=files,
                       blob=np.concatenate(blobs) if blobs else None)


def _list_shard(n: int, path: str, blobs: list, offset: list) -> list[tuple]:
    """(where, label, ref) of every sample of one shard, in the shard's order."""
    gz = open(path, "rb").read(2) == b"\x1f\x8b"
    images: dict[str, tuple] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(path, "r:gz" if gz else "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                ext = "." + ext.lower()
                if ext == ".cls":
                    labels[key] = _label(tf.extractfile(m).read(), m.name, path)
                elif ext in IMAGE_SUFFIXES:
                    images[key] = _ref(n, tf, m, gz, blobs, offset)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard {path} is not a tar file or is damaged ({e}); re-create or re-download it") from None
    unlabeled = sorted(set(images) - set(labels))
    if unlabeled:
        raise DataError(f"shard {path}: sample '{unlabeled[0]}' ({len(unlabeled)} in all) has no .cls label; each "
                        "<key>.jpg needs a <key>.cls holding its class index")
    return [(f"{key} in {path}", labels[key], images[key]) for key in images]


def _ref(n: int, tf: tarfile.TarFile, m: tarfile.TarInfo, gz: bool, blobs: list, offset: list) -> tuple:
    if not gz:
        return n, m.offset_data, m.size
    data = np.frombuffer(tf.extractfile(m).read(), np.uint8)
    blobs.append(data)
    offset[0] += len(data)
    return offset[0] - len(data), len(data)


def _label(raw: bytes, member: str, path: str) -> int:
    try:
        v = int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"shard {path}: {member} holds {raw[:20]!r}, not a class index; write the class index as "
                        "text") from None
    if v < 0:
        raise DataError(f"shard {path}: {member} holds {v}; class indices start at 0")
    return v
