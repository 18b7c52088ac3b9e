"""Image-folder data sets: ``train/<class>/*`` and ``test/<class>/*`` in a folder or tar
archive, decoded once to uint8 tensors (torchvision, PIL as fallback) and cached.
"""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ...errors import DataError
from .cache import DataBundle, cached_bundle, channel_stats, file_stats
from ..run.progress import ProgressEvent

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


def decode_image(data: bytes, where: str) -> torch.Tensor:
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
        reason = (str(e).splitlines() or [type(e).__name__])[0].rstrip(":") or type(e).__name__
        raise DataError(f"cannot read archive {path}: it is damaged or cut short ({reason}); {_ACCEPTS}") from None


_ACCEPTS = ("a data set path is a folder, .tar.gz or .tar holding train/<class>/* and test/<class>/* "
            "(one image file per sample)")


def check_archive(p: Path, given: str) -> None:
    """Refuse a file that is not a tar archive in one line (a single image, a zip, a damaged file)."""
    if p.suffix.lower() in IMAGE_EXTS:
        raise DataError(f"'{given}' is a single image, not a data set: a data set is a name (cifar10, cifar100, "
                        f"mnist, fashion-mnist, synthetic) or a path; {_ACCEPTS}")
    try:
        ok = tarfile.is_tarfile(p)
    except OSError as e:
        raise DataError(f"cannot read '{given}' ({e.strerror or e}); {_ACCEPTS}") from None
    if not ok:
        raise DataError(f"'{given}' is not a tar archive (.tar.gz, .tgz or .tar) or it is damaged; {_ACCEPTS}")


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
    if not p.is_dir():
        check_archive(p, str(path))
    stats = file_stats(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    name = p.name.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar")
    return cached_bundle(Path(cache_dir), "imagefolder", name, stats, lambda: _decode_folder(p, name, progress))


def _decode_folder(p: Path, name: str, progress: Callable[[Any], None] | None = None) -> DataBundle:
    items, prefixes = [], set()
    for rel, data in _iter_files(p):
        parts = [s for s in rel.split("/") if s not in ("", ".")]
        if (len(parts) < 3 or len(parts) > 4 or parts[-3] not in ("train", "test", "val")
                or any(s.startswith(".") for s in parts) or Path(parts[-1]).suffix.lower() not in IMAGE_EXTS):
            continue
        prefixes.add(tuple(parts[:-3]))
        items.append((parts[-3], parts[-2], parts[-1], data))
    eval_name = "test" if any(i[0] == "test" for i in items) else "val"  # torchvision's ImageNet layout: val/
    splits = {s: [i for i in items if i[0] == (eval_name if s == "test" else s)] for s in ("train", "test")}
    if not splits["train"] or not splits["test"] or len(prefixes) > 1:
        raise DataError(f"{p} holds no usable image folder layout: expected train/<class>/<image> and "
                        "test/<class>/<image> or val/<class>/<image> (optionally inside one top-level folder)")
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
                im = decode_image(data, f"{split}/{c}/{f} in {p}")
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
    return DataBundle(name, trx, try_, tex, tey, len(classes), *channel_stats(trx), classes)
