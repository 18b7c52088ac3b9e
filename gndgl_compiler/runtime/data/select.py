"""``train.data``: choose how a run is fed (in memory or streamed) and build the feed.

    train.dataset + train.data.mode ──▶ auto: memory where the decoded set fits (host memory, and on
                                         CUDA the device's), stream otherwise — and say which and why
                                    ──▶ MemoryFeed (load_dataset, as ever) | StreamFeed (index + workers)

A named data set (cifar10, mnist, synthetic, ...) streams from its decoded tensors, except CIFAR-10's
JPEG copy (``$GNDGL_CIFAR10_JPEG``), which streams from its archive as any image folder does.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ...errors import DataError
from ...spec.models import DataFeed
from .batches import stable_seed
from .sources import NAMES, STATS, data_root, check_source, load_dataset
from .downsampled import detect
from .folder import decode_image
from .feed import MemoryFeed, StreamFeed, default_workers
from .index import SourceIndex, Split, index_source
from .transforms import CropPlan, crop_plan, fit_channels

STATS_SAMPLE = 2048
"""Train images whose pixels give a streamed set's mean/std (all of them when there are fewer)."""
FIT_FRACTION = 0.5
"""auto: the decoded set must fit in this fraction of the available memory (host, and CUDA device)."""


@dataclasses.dataclass
class FeedRequest:
    """What a feed is built from: the recipe's data set and augmentation, the model's input, the device."""

    dataset: str
    augment: Any
    shape: tuple[int, int, int]
    device: torch.device
    data: DataFeed | None = None
    root: str | None = None
    download: bool = False
    limit_train: int | None = None
    limit_test: int | None = None
    synthetic: dict | None = None
    on_log: Callable[[dict], None] | None = None
    progress: Callable[[Any], None] | None = None


def load_feed(req: FeedRequest) -> MemoryFeed | StreamFeed:
    """The run's feed (``train.data.mode``: auto, memory or stream), with a note saying which and why.

    Raises:
        DataError: the data set's errors (missing, empty, one class, mismatched classes, bad images).
    """
    cfg = req.data or DataFeed()
    plan = crop_plan(req.augment, req.shape)
    key, low = check_source(req.dataset, root=req.root, download=req.download)
    path = _stream_path(key, low, req.root)
    shards = path is not None and "{" in path
    if shards and cfg.mode == "memory":
        raise DataError(f"shards '{path}' are read streamed only; set train.data.mode: stream (or auto)")
    listed = path is not None and (cfg.mode == "stream" or cfg.mode == "auto" and low not in NAMES)  # named: fit
    index = index_source(path, req.progress) if listed else None
    mode, why = (cfg.mode, f"train.data.mode: {cfg.mode}") if cfg.mode != "auto" else \
        ("stream", "train.data.mode: auto; shards are read streamed") if shards else _auto(index, plan, req)
    workers = default_workers() if cfg.workers is None else cfg.workers
    if mode == "memory":
        bundle = load_dataset(req.dataset, root=req.root, download=req.download,
                              input_shape=None if plan.rrc else req.shape, limit_train=req.limit_train,
                              limit_test=req.limit_test, synthetic=req.synthetic, progress=req.progress)
        return MemoryFeed(bundle, plan, req.device, note=f"data: in memory ({why})" if why else "")
    if index is None:
        bundle = load_dataset(req.dataset, root=req.root, download=req.download, input_shape=req.shape,
                              synthetic=req.synthetic)
        index, name, mean, std = tensor_index(bundle), bundle.name, bundle.mean, bundle.std
    else:
        name, (mean, std) = _name_stats(index, low, path, plan)
    index = limit_index(index, req.limit_train, req.limit_test)
    note = (f"data: streamed by {workers or 'no'} worker process{'es' if workers != 1 else ''}, prefetch "
            f"{cfg.prefetch} batch{'es' if cfg.prefetch != 1 else ''} each ({why}); {len(index.train.labels)} train "
            f"+ {len(index.test.labels)} eval images")
    return StreamFeed(index, name=name, mean=mean, std=std, plan=plan, device=req.device, workers=workers,
                      prefetch=cfg.prefetch, skip_bad=cfg.on_bad_image == "skip", on_log=req.on_log, note=note)


def _stream_path(key: str, low: str, root: str | None) -> str | None:
    """The folder/archive/shards a source streams from (None: a named set read through its decoded tensors)."""
    if low not in NAMES:
        path = key.removeprefix("imagefolder:")
        return None if detect(Path(os.path.expanduser(path))) else path  # downsampled sets stream from tensors
    jpeg = os.environ.get("GNDGL_CIFAR10_JPEG")
    if low == "cifar10" and not (data_root(root) / "cifar-10-batches-py").is_dir() and jpeg and os.path.isfile(jpeg):
        return jpeg
    return None


def _auto(index: SourceIndex | None, plan: CropPlan, req: FeedRequest) -> tuple[str, str]:
    """auto: ("memory" | "stream", why)."""
    if index is None:  # a named or downsampled data set, decoded once (as ever: no note for named ones)
        return "memory", "" if req.dataset.strip().lower() in NAMES else "train.data.mode: auto; downsampled sets fit"
    sizes = {_size(index, j) for j in _spread(len(index.train.labels), 8)} - {None}
    if not sizes:
        return "stream", "train.data.mode: auto; the sampled images cannot be read"
    if len(sizes) > 1:
        return "stream", f"train.data.mode: auto; the images differ in size ({sorted(sizes)[:3]}...), which only " \
                         "the streamed path reads"
    (h, w), c = sizes.pop(), req.shape[0]
    if not plan.rrc:
        h, w = max(h, req.shape[1]), max(w, req.shape[2])
    need = (len(index.train.labels) + len(index.test.labels)) * c * h * w
    room = available_memory(req.device)
    if need <= FIT_FRACTION * room:
        return "memory", f"train.data.mode: auto; decoded {_gb(need)} fits in {_gb(room)} available"
    return "stream", f"train.data.mode: auto; decoded {_gb(need)} does not fit in half of {_gb(room)} available"


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def available_memory(device: torch.device) -> int:
    """Bytes available to hold a decoded data set: host MemAvailable, and on CUDA the less of it and the device's."""
    host = 0
    try:
        with open("/proc/meminfo") as f:
            host = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if device.type == "cuda":
        host = min(host, torch.cuda.mem_get_info(device)[0])
    return host


def _spread(n: int, k: int) -> list[int]:
    return sorted({i * (n - 1) // max(k - 1, 1) for i in range(min(n, k))})


def _size(index: SourceIndex, j: int) -> tuple[int, int] | None:
    try:
        return tuple(_decode(index, index.train, j).shape[1:])
    except (DataError, OSError):
        return None


def _decode(index: SourceIndex, split: Split, j: int) -> torch.Tensor:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(index.read(split.refs[j]), split.names[j])


def _name_stats(index: SourceIndex, low: str, path: str, plan: CropPlan) -> tuple[str, tuple]:
    """The data set's name and (mean, std): CIFAR-10's constants for its JPEG copy, else sampled train pixels."""
    if low == "cifar10":
        return "cifar10", STATS["cifar10"]
    name = Path(path).name.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar")
    return name, sample_stats(index, plan.shape[0])


def sample_stats(index: SourceIndex, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0,1] units) of up to ``STATS_SAMPLE`` train images (as ``channel_stats``)."""
    n = len(index.train.labels)
    idx = range(n) if n <= STATS_SAMPLE else torch.randperm(
        n, generator=torch.Generator().manual_seed(stable_seed("stats")))[:STATS_SAMPLE].tolist()
    s = s2 = torch.zeros(channels, dtype=torch.int64)
    pixels = 0
    for j in idx:
        try:
            im = fit_channels(_decode(index, index.train, j), channels, index.train.names[j])
        except (DataError, OSError):  # reported (or skipped) when its batch is read, as on_bad_image says
            continue
        s = s + im.sum((1, 2), dtype=torch.int64)
        s2 = s2 + im.to(torch.int32).square().sum((1, 2), dtype=torch.int64)
        pixels += im.shape[1] * im.shape[2]
    d = max(pixels, 1) * 255.0
    mean = s.double() / d
    std = (s2.double() / (d * 255.0) - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def tensor_index(bundle) -> SourceIndex:
    """A decoded bundle as a streamed source (``--set train.data.mode=stream`` on cifar10, mnist, synthetic)."""
    def split(x, y, what):
        return Split(list(range(len(y))), y, [f"{what} image {i}" for i in range(len(y))], x)
    return SourceIndex("tensor", Path(bundle.name), list(bundle.classes),
                       split(bundle.train_x, bundle.train_y, "train"), split(bundle.test_x, bundle.test_y, "test"))


def limit_index(index: SourceIndex, limit_train: int | None, limit_test: int | None) -> SourceIndex:
    """Keep the same fixed, class-mixing subset the in-memory path keeps (``data._limit``)."""
    out = {}
    for name, limit in (("train", limit_train), ("test", limit_test)):
        sp = getattr(index, name)
        if limit is not None and (not isinstance(limit, int) or limit <= 0):
            raise DataError(f"limit_{name} must be a positive integer, got {limit!r}")
        if limit is not None and limit < len(sp.labels):
            g = torch.Generator().manual_seed(stable_seed("limit", name))
            sp = sp.select(torch.randperm(len(sp.labels), generator=g)[:limit])
        out[name] = sp
    return dataclasses.replace(index, **out)
