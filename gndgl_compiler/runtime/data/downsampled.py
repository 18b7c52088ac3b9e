"""Downsampled ImageNet in its published forms, decoded once into the in-memory path (they fit):

    Tiny-ImageNet  tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG,
                                      val/images/*.JPEG + val/val_annotations.txt}   (64×64, 200 classes)
    ImageNet32/64  train_data_batch_1..10 + val_data (numpy batches: 'data' N×3·S·S planar RGB,
                   'labels' 1..1000), pickled or as .npz                            (32×32 / 64×64, 1000 classes)

The pickled batches are read with an unpickler that builds numpy arrays and nothing else.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ...errors import DataError
from .cache import DataBundle, cached_bundle, channel_stats, file_stats
from .folder import decode_image
from ..run.progress import ProgressEvent

_NUMPY_NAMES = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}


def detect(p: Path) -> str | None:
    """``tiny-imagenet``, ``imagenet-batches`` or None for a folder in neither layout."""
    if not p.is_dir():
        return None
    if (p / "val" / "val_annotations.txt").is_file() and (p / "train").is_dir():
        return "tiny-imagenet"
    if _batch_files(p, "train"):
        return "imagenet-batches"
    return None


def load_downsampled(p: Path, kind: str, cache: Path, progress: Callable[[Any], None] | None = None) -> DataBundle:
    """Decode (once; cached) a Tiny-ImageNet folder or an ImageNet32/64 batch folder."""
    if kind == "tiny-imagenet":
        files = sorted(q for q in p.rglob("*") if q.is_file() and "test" not in q.relative_to(p).parts[:1])
        return cached_bundle(cache, "tiny-imagenet", p.name, file_stats(files), lambda: _tiny(p, progress))
    files = _batch_files(p, "train") + _batch_files(p, "val")
    return cached_bundle(cache, "imagenet-batches", p.name, file_stats(files), lambda: _batches(p))


# ───────────── Tiny-ImageNet ─────────────

def _tiny(p: Path, progress) -> DataBundle:
    wnids_file = p / "wnids.txt"
    wnids = sorted(wnids_file.read_text().split()) if wnids_file.is_file() else sorted(
        d.name for d in (p / "train").iterdir() if d.is_dir())
    index = {w: i for i, w in enumerate(wnids)}
    train = [(q, index[w]) for w in wnids for q in sorted((p / "train" / w / "images").glob("*")) if q.is_file()]
    val = []
    for n, line in enumerate((p / "val" / "val_annotations.txt").read_text().splitlines(), 1):
        cols = line.split("\t")
        if len(cols) < 2 or cols[1] not in index:
            raise DataError(f"{p / 'val' / 'val_annotations.txt'} line {n}: expected '<file>\\t<wnid>...' with a wnid "
                            f"of train/, got {line[:60]!r}")
        val.append((p / "val" / "images" / cols[0], index[cols[1]]))
    if not train or not val:
        raise DataError(f"{p}: Tiny-ImageNet needs train/<wnid>/images/* and val/images/* listed in "
                        "val/val_annotations.txt")
    total, out = len(train) + len(val), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for rows in (train, val):
            imgs = []
            for q, _ in rows:
                im = decode_image(q.read_bytes(), str(q))
                imgs.append(im.expand(3, -1, -1) if im.shape[0] == 1 else im)  # a few are grayscale
                if progress is not None and (len(out) * len(train) + len(imgs)) % 1024 == 0:
                    progress(ProgressEvent("data", len(out) * len(train) + len(imgs), total))
            sizes = {tuple(im.shape) for im in imgs}
            if len(sizes) > 1:
                raise DataError(f"{p}: Tiny-ImageNet images must all be 64x64 RGB, found {sorted(sizes)[:3]}")
            out.append((torch.stack(imgs), torch.tensor([c for _, c in rows], dtype=torch.int64)))
    (trx, trl), (tex, tel) = out
    return DataBundle(p.name, trx, trl, tex, tel, len(wnids), *channel_stats(trx), wnids)


# ───────────── ImageNet32 / ImageNet64 numpy batches ─────────────

def _batch_files(p: Path, split: str) -> list[Path]:
    pat = re.compile(r"train_data_batch_(\d+)(\.npz)?$" if split == "train" else r"val_data(\.npz)?$")
    found = [q for q in list(p.glob("*")) + list(p.glob("*/*")) if q.is_file() and pat.search(q.name)]
    return sorted(found, key=lambda q: (int(pat.search(q.name).group(1)) if split == "train" else 0, str(q)))


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_NAMES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array part")


def _read_batch(q: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        if q.suffix == ".npz":
            with np.load(q, allow_pickle=False) as z:
                d = {"data": z["data"], "labels": z["labels"]}
        else:
            d = _NumpyOnly(io.BytesIO(q.read_bytes()), encoding="latin1").load()
        x, y = np.asarray(d["data"]), np.asarray(d["labels"]).astype(np.int64)
    except Exception as e:  # pickle / zip / key errors: a damaged or foreign file
        raise DataError(f"cannot read ImageNet batch {q} ({type(e).__name__}: {e}); re-download it") from None
    side = int(round((x.shape[1] / 3) ** 0.5)) if x.ndim == 2 else 0
    if x.dtype != np.uint8 or side * side * 3 != x.shape[1] or len(x) != len(y):
        raise DataError(f"{q} is not an ImageNet32/64 batch: 'data' must be N×(3·S·S) uint8 with one label each")
    return x.reshape(-1, 3, side, side), y - 1  # labels are 1-based


def _batches(p: Path) -> DataBundle:
    train, val = _batch_files(p, "train"), _batch_files(p, "val")
    if not val:
        raise DataError(f"{p} has train_data_batch_* but no val_data; put the validation batch next to them")
    xs, ys = zip(*(_read_batch(q) for q in train))
    tex, tey = _read_batch(val[0])
    trx = torch.from_numpy(np.concatenate(xs))
    k = int(max(np.concatenate(ys).max(), tey.max())) + 1
    return DataBundle(p.name, trx, torch.from_numpy(np.concatenate(ys)), torch.from_numpy(np.ascontiguousarray(tex)),
                      torch.from_numpy(tey), k, *channel_stats(trx), [str(i) for i in range(k)])
