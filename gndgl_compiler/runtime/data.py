"""Data sets, the decode-once cache, deterministic batching and augmentation.

    name ──▶ source (cifar10/100, mnist, fashion-mnist, image folder/.tar.gz, synthetic)
         ──decode once──▶ uint8 N×C×H×W tensors ──safetensors cache──▶ DataBundle
    DataBundle ──Batches(seed, epoch, start_step)──▶ (step, normalised x, y)

All randomness is drawn on the CPU from generators seeded by (seed, epoch, step), so
every process and every device sees the same batches and the same augmentation.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import struct
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .progress import ProgressEvent

CACHE_VERSION = 1
NAMES = ("cifar10", "cifar100", "mnist", "fashion-mnist", "synthetic")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
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


# ───────────────────────────── entry point ─────────────────────────────

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
    key = str(name).strip()
    low = key.lower().replace("_", "-")
    low = {"fashionmnist": "fashion-mnist"}.get(low, low)
    cache = Path(os.path.expanduser(cache_dir or os.environ.get("GNDGL_CACHE") or "~/.cache/gndgl"))
    if low == "synthetic":
        bundle = _synthetic(synthetic or {})
    elif low in ("cifar10", "cifar100"):
        bundle = _load_cifar(low, _data_root(root), download, cache)
    elif low in IDX_CLASSES:
        bundle = _load_idx(low, root, cache)
    elif key.startswith("imagefolder:") or os.path.exists(os.path.expanduser(key)):
        bundle = load_image_folder(key.removeprefix("imagefolder:"), cache, progress=progress)
    elif "/" in key or low.endswith((".tar.gz", ".tgz", ".tar")):
        raise DataError(f"data set path '{key}' does not exist; give a folder or .tar.gz with "
                        "train/<class>/* and test/<class>/*")
    else:
        raise DataError(f"unknown data set '{name}'; valid names are {', '.join(NAMES)}, or a path to an "
                        "image folder / .tar.gz (train/<class>/*, test/<class>/*), also as imagefolder:<path>")
    bundle = _limit(bundle, limit_train, limit_test)
    return adapt_shape(bundle, input_shape) if input_shape is not None else bundle


def _data_root(root: str | None) -> Path:
    return Path(os.path.expanduser(root or os.environ.get("GNDGL_DATA") or "~/.cache/gndgl/data"))


def _limit(b: DataBundle, limit_train: int | None, limit_test: int | None) -> DataBundle:
    out = {}
    for split, limit in (("train", limit_train), ("test", limit_test)):
        x, y = getattr(b, f"{split}_x"), getattr(b, f"{split}_y")
        if limit is not None and (not isinstance(limit, int) or limit <= 0):
            raise DataError(f"limit_{split} must be a positive integer, got {limit!r}")
        if limit is not None and limit < len(x):
            g = torch.Generator().manual_seed(_seed("limit", split))
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


# ───────────────────────────── decode-once cache ─────────────────────────────

def _cached(cache: Path, kind: str, name: str, stats: list, build) -> DataBundle:
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
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file({k: getattr(b, k).contiguous() for k in _TENSORS}, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        warnings.warn(f"could not write the data cache {path} ({e}); the data set will be decoded again next time")
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _file_stats(paths) -> list:
    return [[str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


# ───────────────────────────── sources ─────────────────────────────

def _load_cifar(name: str, root: Path, download: bool, cache: Path) -> DataBundle:
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
    return _cached(cache, name, name, _file_stats(files), build)


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
    dirs.append(_data_root(None) / name)
    dirs += [Path("/usr/share/datasets/fashion-mnist")] if name == "fashion-mnist" else []
    wanted = [f for pair in IDX_FILES.values() for f in pair]
    for d in dirs:
        found = [next((d / (f + ext) for ext in ("", ".gz") if (d / (f + ext)).is_file()), None) for f in wanted]
        if all(found):
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

    return _cached(cache, name, name, _file_stats(found), build)


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
    return DataBundle("synthetic", xtr, ytr, xte, yte, k, *_channel_stats(xtr), [f"class{i}" for i in range(k)])


def _decode_image(data: bytes, where: str) -> torch.Tensor:
    """Decode image bytes to uint8 C×H×W (alpha dropped); torchvision first, PIL as fallback."""
    try:
        from torchvision.io import ImageReadMode, decode_image
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        if img.dtype != torch.uint8 or img.dim() != 3:
            raise ValueError("not an 8-bit still image")
    except Exception:
        try:
            from PIL import Image
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
                a = np.asarray(im)
            img = torch.from_numpy(a.copy()).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1)
        except Exception as e:
            raise DataError(f"cannot decode image {where} ({e}); remove or replace the file") from None
    return img[:3] if img.shape[0] in (3, 4) else img[:1]


def _iter_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (relative posix name, bytes) of every regular file in a folder or tar archive."""
    if path.is_dir():
        for q in sorted(q for q in path.rglob("*") if q.is_file()):
            yield q.relative_to(path).as_posix(), q.read_bytes()
        return
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if m.isfile():
                    yield m.name, tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read archive {path} ({e}); give a .tar.gz or folder with train/<class>/* "
                        "and test/<class>/*") from None


def load_image_folder(path: str | os.PathLike, cache_dir: str | os.PathLike,
                      progress: Callable[[Any], None] | None = None) -> DataBundle:
    """Load ``train/<class>/*`` and ``test/<class>/*`` images from a folder or tar archive (cached).

    Args:
        path: folder or ``.tar.gz``/``.tgz``/``.tar`` (may hold one top-level folder).
        cache_dir: where the decoded tensors are cached.
        progress: called with ``ProgressEvent("data", done, total)`` every 256 decoded images.
    Returns:
        The bundle; classes are the sorted train class folder names, mean/std from the train set.
    Raises:
        DataError: missing path, no images, unreadable or differently sized images.
    """
    p = Path(os.path.expanduser(str(path))).resolve()
    if not p.exists():
        raise DataError(f"image folder '{path}' does not exist")
    stats = _file_stats(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    name = p.name.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar")
    return _cached(Path(cache_dir), "imagefolder", name, stats, lambda: _decode_folder(p, name, progress))


def _decode_folder(p: Path, name: str, progress: Callable[[Any], None] | None = None) -> DataBundle:
    items, prefixes = [], set()
    for rel, data in _iter_files(p):
        parts = [s for s in rel.split("/") if s not in ("", ".")]
        if (len(parts) < 3 or len(parts) > 4 or parts[-3] not in ("train", "test")
                or any(s.startswith(".") for s in parts) or Path(parts[-1]).suffix.lower() not in IMAGE_EXTS):
            continue
        prefixes.add(tuple(parts[:-3]))
        items.append((parts[-3], parts[-2], parts[-1], data))
    splits = {s: [i for i in items if i[0] == s] for s in ("train", "test")}
    if not splits["train"] or not splits["test"] or len(prefixes) > 1:
        raise DataError(f"{p} holds no usable image folder layout: expected train/<class>/<image> and "
                        "test/<class>/<image> (optionally inside one top-level folder)")
    classes = sorted({i[1] for i in splits["train"]})
    extra = sorted({i[1] for i in splits["test"]} - set(classes))
    if extra:
        raise DataError(f"{p}: test classes {extra} have no train folder; every class needs train images")
    index, out, first, done = {c: i for i, c in enumerate(classes)}, {}, None, 0
    total = len(splits["train"]) + len(splits["test"])
    with warnings.catch_warnings():  # torchvision >= 0.29 warns on every decode call
        warnings.simplefilter("ignore", DeprecationWarning)
        for split, rows in splits.items():
            rows.sort(key=lambda i: (index[i[1]], i[2]))
            imgs = []
            for _, c, f, data in rows:
                im = _decode_image(data, f"{split}/{c}/{f} in {p}")
                first = im if first is None else first
                if im.shape[1:] != first.shape[1:]:
                    raise DataError(f"{p}: images must all have one size, but {split}/{c}/{f} is {im.shape[1]}x"
                                    f"{im.shape[2]} and the first is {first.shape[1]}x{first.shape[2]}; resize them")
                imgs.append(im)
                done += 1
                if progress is not None and (done % 256 == 0 or done == total):
                    progress(ProgressEvent("data", done, total))
            out[split] = imgs, torch.tensor([index[r[1]] for r in rows], dtype=torch.int64)
    chans = max(im.shape[0] for imgs, _ in out.values() for im in imgs)  # gray images join RGB ones as RGB
    (trx, try_), (tex, tey) = ((torch.stack([im.expand(chans, -1, -1) for im in imgs]), y) for imgs, y in out.values())
    return DataBundle(name, trx, try_, tex, tey, len(classes), *_channel_stats(trx), classes)


# ───────────────────────────── batching and augmentation ─────────────────────────────

def _seed(*parts) -> int:
    """A stable 63-bit seed derived from ``parts`` (independent of Python's hash randomisation)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Return the shuffled order of ``n`` samples for ``epoch`` (CPU int64, identical on every process)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed("perm", seed, epoch)))


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Return the number of batches of ``batch_size`` in ``n`` samples (a short last one unless ``drop_last``)."""
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> list[torch.Tensor]:
    """Return the CPU index tensor of every step of ``epoch``; step ``i`` is element ``i``."""
    perm = epoch_permutation(n, seed, epoch)
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(steps_per_epoch(n, batch_size, drop_last))]


def augment_params(n: int, *, seed: int, epoch: int, step: int, pad: int = 4,
                   flip: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the CPU crop offsets (dy, dx in [0, 2*pad]) and flip mask that :func:`augment` uses."""
    g = torch.Generator().manual_seed(_seed("aug", seed, epoch, step))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    mask = torch.randint(0, 2, (n,), generator=g).bool() if flip else torch.zeros(n, dtype=torch.bool)
    return dy, dx, mask


def augment(x_uint8: torch.Tensor, *, seed: int, epoch: int, step: int, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding ``pad`` plus random horizontal flip of an N×C×H×W batch, on its device.

    The draw (see :func:`augment_params`) depends only on (seed, epoch, step) and is made on the CPU.
    Returns a tensor of the same shape and dtype (``x_uint8`` itself when pad=0 and flip=False).
    Raises DataError when ``x_uint8`` is not 4-D or ``pad`` is negative.
    """
    if x_uint8.dim() != 4 or pad < 0:
        raise DataError(f"augment needs N×C×H×W images and pad >= 0, got shape {tuple(x_uint8.shape)}, pad {pad}")
    if pad == 0 and not flip:
        return x_uint8
    n, c, h, w = x_uint8.shape
    dev = x_uint8.device
    dy, dx, mask = (t.to(dev) for t in augment_params(n, seed=seed, epoch=epoch, step=step, pad=pad, flip=flip))
    xp = F.pad(x_uint8, (pad, pad, pad, pad)) if pad else x_uint8
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = dy[:, None] + ar_h                                        # N×H
    cols = dx[:, None] + torch.where(mask[:, None], w - 1 - ar_w, ar_w)  # N×W, reversed where flipped
    ni = torch.arange(n, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return xp[ni, ci, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(x_uint8: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return ``(x/255 - mean)/std`` per channel (channel dim -3) as ``dtype`` (computed in float32)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    return (x_uint8.to(torch.float32) * (1.0 / (255.0 * s)) - m / s).to(dtype)


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo :func:`normalize`: return images in [0, 1] units (not clamped)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * s + m


class Batches:
    """Iterates ``(step, x_float_normalised, y)`` for one epoch from a resumable position.

    Train batches follow :func:`epoch_permutation` and are augmented with :func:`augment`;
    test batches (``train=False``) are sequential, unaugmented and keep the short last batch.
    ``len()`` is the number of batches still to come (total minus ``start_step``).

    Raises:
        DataError: non-positive batch size, a batch larger than the training set with
            ``drop_last``, or ``start_step`` outside the epoch.
    """

    def __init__(self, bundle: DataBundle, *, batch_size: int, seed: int, epoch: int, start_step: int = 0,
                 train: bool = True, augment: bool = True, pad: int = 4, flip: bool = True,
                 drop_last: bool = True, dtype: torch.dtype = torch.float32, channels_last: bool = False):
        self.x, self.y = (bundle.train_x, bundle.train_y) if train else (bundle.test_x, bundle.test_y)
        self.mean, self.std = bundle.mean, bundle.std
        self.batch_size, self.seed, self.epoch, self.train = batch_size, seed, epoch, train
        self.augment, self.pad, self.flip = augment and train, pad, flip
        self.drop_last = drop_last and train
        self.dtype, self.channels_last = dtype, channels_last
        self.total_steps = steps_per_epoch(len(self.x), batch_size, self.drop_last)
        if self.total_steps == 0 and len(self.x):
            raise DataError(f"batch size {batch_size} is larger than the {len(self.x)} training images; "
                            "lower the batch size or use more data")
        if not 0 <= start_step <= self.total_steps:
            raise DataError(f"start step {start_step} is outside the epoch of {self.total_steps} steps")
        self.start_step = start_step

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        n, bs, dev = len(self.x), self.batch_size, self.x.device
        perm = epoch_permutation(n, self.seed, self.epoch) if self.train else None
        for step in range(self.start_step, self.total_steps):
            if perm is None:
                xb, yb = self.x[step * bs:(step + 1) * bs], self.y[step * bs:(step + 1) * bs]
            else:
                idx = perm[step * bs:(step + 1) * bs].to(dev)
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if self.augment:
                xb = augment(xb, seed=self.seed, epoch=self.epoch, step=step, pad=self.pad, flip=self.flip)
            xb = normalize(xb, self.mean, self.std, self.dtype)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield step, xb, yb
