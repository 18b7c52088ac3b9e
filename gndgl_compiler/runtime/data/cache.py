"""A decoded data set in memory (:class:`DataBundle`) and the decode-once cache that keeps it on disk.

    build() ──▶ DataBundle ──safetensors──▶ <cache>/data-<kind>-<digest>.safetensors

The cache key is the source's kind and its files' (path, size, mtime): a changed file
is decoded again, a corrupt or foreign cache file is ignored and rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import fsio

CACHE_VERSION = 1
_TENSORS = ("train_x", "train_y", "test_x", "test_y")


@dataclass
class DataBundle:
    """A decoded data set: uint8 images N×C×H×W, int64 labels, normalisation constants."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]

    def to(self, device) -> "DataBundle":
        """Return a copy whose four tensors live on ``device``."""
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in _TENSORS})

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The C×H×W shape of one image."""
        return tuple(self.train_x.shape[1:])


def cached_bundle(cache: Path, kind: str, name: str, stats: list, build) -> DataBundle:
    """Return the cached bundle for (kind, stats) or build, store and return it."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, kind, stats]).encode()).hexdigest()[:20]
    path = cache / f"data-{kind}-{digest}.safetensors"
    bundle = _read_cache(path, name)
    if bundle is None:
        bundle = build()
        _write_cache(path, bundle)
    return bundle


def _read_cache(path: Path, name: str) -> DataBundle | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in _TENSORS}
        classes, mean, std = (json.loads(meta[k]) for k in ("classes", "mean", "std"))
        ok = (t["train_x"].dtype == t["test_x"].dtype == torch.uint8 and t["train_x"].dim() == 4
              and t["train_y"].dtype == t["test_y"].dtype == torch.int64
              and len(t["train_x"]) == len(t["train_y"]) and len(t["test_x"]) == len(t["test_y"])
              and len(mean) == len(std) == t["train_x"].shape[1] and t["test_x"].shape[1:] == t["train_x"].shape[1:])
        if not ok:
            return None
        return DataBundle(name, *(t[k] for k in _TENSORS), len(classes), tuple(mean), tuple(std), list(classes))
    except Exception:  # a corrupt or foreign cache file is ignored and rebuilt
        return None


def _write_cache(path: Path, b: DataBundle) -> None:
    from safetensors.torch import save_file
    meta = {"classes": json.dumps(b.classes), "mean": json.dumps(list(b.mean)), "std": json.dumps(list(b.std)),
            "name": b.name, "format": f"gndgl-data-{CACHE_VERSION}"}

    def write(tmp: Path) -> None:
        save_file({k: getattr(b, k).contiguous() for k in _TENSORS}, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)  # a shared cache: readable by every user
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fsio.atomic_write_via(path, write, error=None)
    except (OSError, RuntimeError) as e:
        warnings.warn(f"could not write the data cache {path} ({e}); the data set will be decoded again next time",
                      stacklevel=2)


def file_stats(paths) -> list:
    """``[resolved path, size, mtime_ns]`` of each file: what a cache entry records to notice a changed source."""
    return [[str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0,1] units) of uint8 images N×C×H×W, computed in chunks."""
    s = s2 = torch.zeros(x.shape[1], dtype=torch.int64)
    for chunk in x.split(1024):
        s = s + chunk.sum((0, 2, 3), dtype=torch.int64)
        s2 = s2 + chunk.to(torch.int32).square().sum((0, 2, 3), dtype=torch.int64)
    n = max(x.numel() // max(x.shape[1], 1), 1) * 255.0
    mean = s.double() / n
    std = (s2.double() / (n * 255.0) - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())
