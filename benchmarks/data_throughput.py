"""Images per second delivered to the training loop: gndgl's streamed path against torchvision's
``ImageFolder`` + ``DataLoader`` with the same transforms and the same number of workers, and a
training run's throughput with the streamed path against the in-memory path on the same data.

1. ImageNet recipe: a generated folder of JPEGs (shorter side 224, longer side 224..298, smooth
   pictures with some noise; written to a temp dir, removed afterwards), ``RandomResizedCrop(224)``
   + flip, normalised float batches of ``--batch``. torchvision: PIL decode, ``RandomResizedCrop``,
   ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` per sample, default collate; gndgl:
   ``train.data: {mode: stream}`` (decode, crop, resize, flip of a whole step in one worker; uint8
   batches; normalised in the loop's process). Both iterate one whole epoch; the two run interleaved
   ``--rounds`` times and the table shows the median.
2. CIFAR recipe on 32-px JPEGs (``$GNDGL_CIFAR10_JPEG``'s first ``--cifar``/10 train images of each class
   extracted to a temp folder, else generated): pad-4 crop + flip; torchvision ``RandomCrop(32, padding=4)``.
3. Training: ``gndgl train`` (Python API) of ``specs/resnet32_k2g2.yaml`` for ``--steps`` steps on the
   32-px folder, in memory and streamed: images/s of the run (the loader must not be the bottleneck).

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py --images 2000 --workers 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gndgl_compiler.runtime.data.select import FeedRequest, load_feed
from gndgl_compiler.spec.models import Augment, DataFeed, RandomResizedCrop

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REPO = Path(__file__).resolve().parents[1]


def make_folder(root: Path, n: int, *, side: int, classes: int = 10, vary: bool = True) -> Path:
    """n train + n/10 val JPEGs of smooth random pictures (plus noise), shorter side ``side``."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", max(classes, n // 10))):
        for i in range(count):
            c = i % classes
            d = root / split / f"c{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            w = side + (int(rng.integers(0, side // 3)) if vary else 0)
            base = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
            img = Image.fromarray(base).resize((w, side), Image.BICUBIC)
            px = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (side, w, 3))
            Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    return root


def cifar_folder(root: Path, n: int) -> tuple[Path, str]:
    """The first n train (and n/10 test) images of $GNDGL_CIFAR10_JPEG, else n generated 32-px ones."""
    src = os.environ.get("GNDGL_CIFAR10_JPEG")
    if not src or not os.path.isfile(src):
        return make_folder(root, n, side=32, vary=False), "generated 32-px JPEGs"
    want = {"train": n // 10, "test": max(1, n // 100)}  # per class: the archive is sorted by class
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(src) as tf:
        for m in tf:
            parts = m.name.split("/")
            if not (m.isfile() and len(parts) >= 3 and parts[-3] in want):
                continue
            key = (parts[-3], parts[-2])
            if taken.get(key, 0) < want[parts[-3]]:
                taken[key] = taken.get(key, 0) + 1
                out = root / "/".join(parts[-3:])
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tf.extractfile(m).read())
    return root, "CIFAR-10 JPEG copy"


def gndgl_epoch(folder: Path, augment, shape, workers: int, batch: int) -> float:
    feed = load_feed(FeedRequest(str(folder), augment, shape, torch.device("cpu"),
                                 DataFeed(mode="stream", workers=workers, prefetch=2)))
    t, n = time.perf_counter(), 0
    for _, _x, y in feed.batches(batch_size=batch, seed=0, epoch=0, train=True, augment=True,
                                pad=augment.crop_pad, flip=True):
        n += len(y)
    return n / (time.perf_counter() - t)


def torchvision_epoch(folder: Path, tf, workers: int, batch: int) -> float:
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(str(folder / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         prefetch_factor=2 if workers else None)
    t, n = time.perf_counter(), 0
    for _x, y in loader:
        n += len(y)
    return n / (time.perf_counter() - t)


def compare(name: str, folder: Path, augment, shape, tv_tf, args) -> None:
    runs: dict[str, list[float]] = {"gndgl streamed": [], "torchvision ImageFolder": []}
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for key in order:
            fn = (lambda: gndgl_epoch(folder, augment, shape, args.workers, args.batch)) if key.startswith("gndgl") \
                else (lambda: torchvision_epoch(folder, tv_tf, args.workers, args.batch))
            runs[key].append(fn())
    tv = statistics.median(runs["torchvision ImageFolder"])
    for key, vals in runs.items():
        med = statistics.median(vals)
        print(f"| {name} | {key} | {args.workers} | {med:,.0f} | {med / tv:.2f}× |")


def train_rate(folder: Path, mode: str, steps: int, workers: int, tmp: Path) -> float:
    from gndgl_compiler import compile_spec
    from gndgl_compiler.runtime.train import TrainOptions, train_artifact
    art = compile_spec(REPO / "specs" / "resnet32_k2g2.yaml", tmp / f"art-{mode}")
    opts = TrainOptions(dataset=str(folder), epochs=1, batch_size=64, max_steps=steps, tensorboard=False,
                        run_dir=str(tmp / f"run-{mode}"), overrides=[f"train.data.mode={mode}",
                                                                    f"train.data.workers={workers}"])
    return train_artifact(art, opts)["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="generated 224-px train images")
    ap.add_argument("--cifar", type=int, default=5000, help="32-px train images")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="training steps per mode")
    args = ap.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)
    import torchvision.transforms as T
    with tempfile.TemporaryDirectory(prefix="gndgl-data-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        big = make_folder(tmp / "imagenet-like", args.images, side=224)
        small, what = cifar_folder(tmp / "cifar", args.cifar)
        print(f"generated in {time.perf_counter() - t:.0f} s; torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs\n")
        print("| data | loader | workers | images/s | vs torchvision |\n|---|---|---|---|---|")
        rrc = Augment(random_resized_crop=RandomResizedCrop(size=224))
        compare(f"{args.images} JPEGs ~224×260, RandomResizedCrop(224)+flip", big, rrc, (3, 224, 224),
                T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]),
                args)
        compare(f"{args.cifar} {what}, pad-4 crop+flip", small, Augment(), (3, 32, 32),
                T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(MEAN, STD)]), args)
        print(f"\n| training run (resnet32_k2g2, batch 64, {args.steps} steps, {what}) | images/s |\n|---|---|")
        for mode in ("memory", "stream"):
            print(f"| {mode} | {train_rate(small, mode, args.steps, args.workers, tmp):,.0f} |")


if __name__ == "__main__":
    main()
