"""Data sets by name: find and load CIFAR-10/100, MNIST, Fashion-MNIST, image folders /
archives and synthetic data as a :class:`DataBundle`, limited and shape-adapted to the model.

    name ──▶ source (cifar10/100, mnist, fashion-mnist, image folder/.tar.gz, synthetic)
         ──decode once──▶ uint8 N×C×H×W tensors ──safetensors cache──▶ DataBundle

The cache is :mod:`.data_cache`, image folders :mod:`.data_folder`, batching and
augmentation :mod:`.batches`.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import DataError
from .batches import stable_seed
from .cache import DataBundle, cached_bundle, channel_stats, file_stats
from .downsampled import detect, load_downsampled
from .folder import load_image_folder

NAMES = ("cifar10", "cifar100", "mnist", "fashion-mnist", "synthetic")
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}
IDX_CLASSES = {"mnist": [str(i) for i in range(10)], "fashion-mnist": [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SYNTHETIC_DEFAULTS = {"n_train": 512, "n_test": 128, "num_classes": 10, "shape": (3, 32, 32), "seed": 0}


def load_dataset(name: str, *, root: str | None = None, cache_dir: str | None = None,
                 download: bool = False, input_shape: tuple[int, int, int] | None = None,
                 limit_train: int | None = None, limit_test: int | None = None,
                 synthetic: dict | None = None, progress: Callable[[Any], None] | None = None) -> DataBundle:
    """Load a data set by name or path.

    Args:
        name: ``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist``, ``synthetic``, or a path
            (optionally ``imagefolder:<path>``) to a folder / ``.tar.gz`` with ``train/<class>/*``
            and ``test/<class>/*``.
        root: where torchvision / IDX files live (default ``$GNDGL_DATA`` or ``~/.cache/gndgl/data``).
        cache_dir: where decoded tensors are cached (default ``$GNDGL_CACHE`` or ``~/.cache/gndgl``).
        download: let torchvision download CIFAR files (needs internet).
        input_shape: C×H×W the model wants; 1→3 channels and smaller images (zero-padded) are adapted.
        limit_train, limit_test: keep only this many images (a fixed, class-mixing subset).
        synthetic: options for ``synthetic`` (n_train, n_test, num_classes, shape, seed).
        progress: called with a ``ProgressEvent("data", done, total)`` while images are decoded
            (image folders / archives on their first use; cached afterwards).
    Returns:
        The :class:`DataBundle` (CPU tensors).
    Raises:
        DataError: unknown name, files missing or unreadable, impossible shape adaptation.
    """
    key, low = check_source(name, root=root, download=download)
    cache = Path(os.path.expanduser(cache_dir or os.environ.get("GNDGL_CACHE") or "~/.cache/gndgl"))
    if low == "synthetic":
        bundle = _synthetic(synthetic or {})
    elif low in ("cifar10", "cifar100"):
        bundle = _load_cifar(low, data_root(root), download, cache, explicit_root=bool(root))
    elif low in IDX_CLASSES:
        bundle = _load_idx(low, root, cache)
    else:
        path = key.removeprefix("imagefolder:")
        kind = detect(Path(os.path.expanduser(path)))
        bundle = load_downsampled(Path(os.path.expanduser(path)).resolve(), kind, cache, progress) if kind else \
            load_image_folder(path, cache, progress=progress)
    bundle = _limit(bundle, limit_train, limit_test)
    return adapt_shape(bundle, input_shape) if input_shape is not None else bundle


def check_source(name: str, *, root: str | None = None, download: bool = False) -> tuple[str, str]:
    """Check what can be checked of a data set without reading it (before compiling or starting
    workers): a known name or an existing path, and ``root`` (``--data-root``) an existing folder
    (unless ``--download`` is to fill it); warn when ``root`` is not used by this data set.

    Returns:
        ``(key, low)``: the name as given (stripped) and its canonical lower-case form.

    Raises:
        DataError: an unknown name, a path that does not exist, or a ``root`` that is not a folder.
    """
    key = str(name).strip()
    low = key.lower().replace("_", "-")
    low = {"fashionmnist": "fashion-mnist"}.get(low, low)
    shards = "{" in key and "}" in key  # a brace pattern of shards, checked when listed (stream_shards.py)
    if low not in NAMES and not (key.startswith("imagefolder:") or shards or os.path.exists(os.path.expanduser(key))):
        if "/" in key or low.endswith((".tar.gz", ".tgz", ".tar")):
            raise DataError(f"data set path '{key}' does not exist; give a folder or .tar.gz with "
                            "train/<class>/* and test/<class>/*")
        raise DataError(f"unknown data set '{name}'; valid names are {', '.join(NAMES)}, or a path to an "
                        "image folder / .tar.gz (train/<class>/*, test/<class>/*), also as imagefolder:<path>")
    if not root:
        return key, low
    path = Path(os.path.expanduser(root))
    cifar = low in ("cifar10", "cifar100")
    unused = f"data set '{key}' is " + ("generated" if low == "synthetic" else "read from its own path")
    if not cifar and low not in IDX_CLASSES:
        if not path.is_dir():
            raise DataError(f"--data-root '{root}' is not a folder, and it is not used: {unused}; "
                            "leave --data-root out")
        warnings.warn(f"--data-root {root} is not used: {unused}", stacklevel=2)
        return key, low
    if not path.is_dir() and (path.exists() or not (cifar and download)):
        what = "is not a folder" if path.exists() else "does not exist"
        raise DataError(f"--data-root '{root}' {what}; give the folder that holds the {key} files, or leave "
                        f"--data-root out to look in the default places ($GNDGL_DATA or ~/.cache/gndgl/data"
                        f"{', /usr/share/datasets/fashion-mnist' if low == 'fashion-mnist' else ''})"
                        + (" or pass --download where there is internet to fetch it there; an image folder / "
                           ".tar.gz works too (--dataset /path/cifar10-jpeg.tar.gz)" if cifar else ""))
    return key, low


def data_root(root: str | None) -> Path:
    """Where data sets are looked for and downloaded: ``root``, else ``$GNDGL_DATA``, else ``~/.cache/gndgl/data``."""
    return Path(os.path.expanduser(root or os.environ.get("GNDGL_DATA") or "~/.cache/gndgl/data"))


def _limit(b: DataBundle, limit_train: int | None, limit_test: int | None) -> DataBundle:
    out = {}
    for split, limit in (("train", limit_train), ("test", limit_test)):
        x, y = getattr(b, f"{split}_x"), getattr(b, f"{split}_y")
        if limit is not None and (not isinstance(limit, int) or limit <= 0):
            raise DataError(f"limit_{split} must be a positive integer, got {limit!r}")
        if limit is not None and limit < len(x):
            g = torch.Generator().manual_seed(stable_seed("limit", split))
            idx = torch.randperm(len(x), generator=g)[:limit]
            x, y = x[idx].contiguous(), y[idx].contiguous()
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    return dataclasses.replace(b, **out)


def adapt_shape(b: DataBundle, shape) -> DataBundle:
    """Adapt ``b``'s images to ``shape`` (C, H, W): repeat 1→3 channels, zero-pad smaller images centred.

    Returns ``b`` itself when the shape already matches, else an adapted copy (mean/std repeated).
    Raises DataError when the shape is malformed, smaller than the images, or needs 3→1 channels.
    """
    try:
        c, h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise DataError(f"input_shape must be three integers C, H, W, got {shape!r}") from None
    c0, h0, w0 = b.input_shape
    if (c, h, w) == (c0, h0, w0):
        return b
    if not (c in (c0, 3) and c0 in (1, c) and h >= h0 and w >= w0):
        raise DataError(f"cannot adapt data set '{b.name}' images of shape {c0}x{h0}x{w0} to the model input "
                        f"{c}x{h}x{w}; only 1→3 channels and zero-padding smaller images are supported — "
                        "change the spec's input shape or the data set")
    out, rep = {}, c // c0
    pads = ((w - w0) // 2, w - w0 - (w - w0) // 2, (h - h0) // 2, h - h0 - (h - h0) // 2)
    for k in ("train_x", "test_x"):
        x = getattr(b, k)
        x = x.repeat(1, rep, 1, 1) if rep > 1 else x
        out[k] = F.pad(x, pads).contiguous() if any(pads) else x.contiguous()
    return dataclasses.replace(b, mean=tuple(b.mean) * rep, std=tuple(b.std) * rep, **out)


# ───────────────────────────── sources ─────────────────────────────

def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load_cifar(name: str, root: Path, download: bool, cache: Path, explicit_root: bool = False) -> DataBundle:
    import torchvision.datasets as tvd
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    base = root / cls.base_folder
    reason = ""
    if not base.is_dir() and download:
        try:
            for train in (True, False):
                cls(str(root), train=train, download=True)
        except Exception as e:  # offline, disk full, ...
            reason = f" (download failed: {_first_line(e)})"
    if not base.is_dir():
        jpeg = os.environ.get("GNDGL_CIFAR10_JPEG")
        if name == "cifar10" and jpeg and os.path.isfile(jpeg):
            if explicit_root:
                warnings.warn(f"CIFAR10 is not in --data-root {root} (looked for {base}); using the JPEG copy "
                              f"$GNDGL_CIFAR10_JPEG={jpeg} instead", stacklevel=2)
            b = load_image_folder(jpeg, cache)
            return dataclasses.replace(b, name="cifar10", mean=STATS["cifar10"][0], std=STATS["cifar10"][1])
        raise DataError(f"{name.upper()} was not found in {root} (looked for {base}){reason}. Pass --download where "
                        "there is internet, or point --data-root at an extracted torchvision copy, or use an image "
                        "folder / .tar.gz (e.g. a JPEG copy of CIFAR-10 as --dataset /path/cifar10-jpeg.tar.gz)")

    def build() -> DataBundle:
        try:
            tr, te = cls(str(root), train=True), cls(str(root), train=False)
        except Exception as e:
            raise DataError(f"the {name} files in {base} cannot be read ({_first_line(e)}); delete the "
                            "folder and pass --download, or point --data-root at a good copy") from None
        conv = [(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets, dtype=torch.int64))
                for d in (tr, te)]
        return DataBundle(name, *conv[0], *conv[1], len(tr.classes), *STATS[name], list(tr.classes))

    files = sorted(p for p in base.rglob("*") if p.is_file())
    return cached_bundle(cache, name, name, file_stats(files), build)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed).

    Args:
        path: the file.
    Returns:
        The array with the file's dimensions and dtype.
    Raises:
        DataError: the file is not a valid IDX file.
    """
    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in dtypes or len(raw) < 4 + 4 * raw[3]:
        raise DataError(f"{path} is not an IDX file (bad header); re-download or re-extract it")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(dtypes[raw[2]])
    count = math.prod(dims)
    if len(raw) - 4 - 4 * ndim < count * dtype.itemsize:
        raise DataError(f"IDX file {path} is truncated: header says {dims}; re-download or re-extract it")
    return np.frombuffer(raw, dtype, count, 4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


def _load_idx(name: str, root: str | None, cache: Path) -> DataBundle:
    tv_dir = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    dirs = [Path(os.path.expanduser(root)) / d for d in ("", name, f"{tv_dir}/raw")] if root else []
    dirs.append(data_root(None) / name)
    dirs += [Path("/usr/share/datasets/fashion-mnist")] if name == "fashion-mnist" else []
    wanted = [f for pair in IDX_FILES.values() for f in pair]
    for d in dirs:
        found = [next((d / (f + ext) for ext in ("", ".gz") if (d / (f + ext)).is_file()), None) for f in wanted]
        if all(found):
            if root and d not in dirs[:3]:
                warnings.warn(f"{name} is not in --data-root {root} (looked in {', '.join(str(x) for x in dirs[:3])}"
                              f"); using the copy in {d}", stacklevel=2)
            break
    else:
        hint = "Run 'apt-get install dataset-fashion-mnist', or p" if name == "fashion-mnist" else "P"
        raise DataError(f"{name} IDX files ({', '.join(wanted)}, optionally .gz) were not found in any of: "
                        f"{', '.join(str(d) for d in dirs)}. {hint}ut the files in one of these folders "
                        "(--data-root or $GNDGL_DATA/" + name + "); --download is not supported for IDX data sets")

    def build() -> DataBundle:
        arrays = [read_idx(p) for p in found]
        xs, ys = arrays[0::2], arrays[1::2]
        for x, y, p in zip(xs, ys, found[0::2]):
            if x.ndim != 3 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y):
                raise DataError(f"IDX images {p} ({x.shape}, {x.dtype}) do not match their labels ({y.shape})")
        conv = [(torch.from_numpy(x).unsqueeze(1).contiguous(), torch.from_numpy(y.astype(np.int64)))
                for x, y in zip(xs, ys)]
        return DataBundle(name, *conv[0], *conv[1], 10, *STATS[name], IDX_CLASSES[name])

    return cached_bundle(cache, name, name, file_stats(found), build)


def _synthetic(opts: dict) -> DataBundle:
    if set(opts) - set(SYNTHETIC_DEFAULTS):
        raise DataError(f"unknown synthetic option(s) {sorted(set(opts) - set(SYNTHETIC_DEFAULTS))}; "
                        f"valid: {', '.join(SYNTHETIC_DEFAULTS)}")
    o = {**SYNTHETIC_DEFAULTS, **opts}
    try:
        n_train, n_test, k, seed = (int(o[f]) for f in ("n_train", "n_test", "num_classes", "seed"))
        c, h, w = (int(s) for s in o["shape"])
    except (TypeError, ValueError):
        raise DataError(f"synthetic options must be integers and shape three integers, got {opts}") from None
    if min(n_train, n_test, k, c, h, w) < 1:
        raise DataError(f"synthetic sizes must be positive, got {o}")
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(k, c, 4, 4, generator=g), size=(h, w), mode="nearest")

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randperm(n, generator=g) % k
        x = 255 * (0.2 + 0.6 * protos[y]) + 40 * torch.randn(n, c, h, w, generator=g)
        return x.round().clamp(0, 255).to(torch.uint8).contiguous(), y.to(torch.int64)

    (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
    return DataBundle("synthetic", xtr, ytr, xte, yte, k, *channel_stats(xtr), [f"class{i}" for i in range(k)])
