"""Streamed data (``train.data``, ``runtime/stream_*.py``): the streamed path gives the in-memory
path's batches; order and augmentation are functions of (seed, epoch, index), not of the number of
workers; a resumed epoch reads the same batches; bad folders and images exit 2 with the path.

Every data set here is a few dozen tiny JPEGs the tests write into ``tmp_path``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from tiny_spec import tiny_spec

from gndgl_compiler.errors import DataError
from gndgl_compiler.runtime.data.batches import stable_seed
from gndgl_compiler.runtime.data.select import FeedRequest, load_feed
from gndgl_compiler.runtime.data.transforms import rrc_box, rrc_draws
from gndgl_compiler.spec.models import Augment, DataFeed, RandomResizedCrop

CPU = torch.device("cpu")
CLASSES = ("cat", "dog", "emu")


def make_folder(root: Path, *, n_train: int = 10, n_eval: int = 4, eval_name: str = "test", size=(32, 32),
                classes=CLASSES, seed: int = 0) -> Path:
    """train/<class>/NNN.jpg and <eval_name>/<class>/NNN.jpg of random pixels (sizes vary when size is None)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), (eval_name, n_eval)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = size or (int(rng.integers(20, 48)), int(rng.integers(20, 48)))
                px = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                Image.fromarray(px).save(root / split / c / f"{i:03d}.jpg", quality=85)
    return root


def make_tar(folder: Path, out: Path) -> Path:
    mode = "w:gz" if out.name.endswith(".gz") else "w"
    with tarfile.open(out, mode) as tf:
        tf.add(folder, arcname="data")
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("stream") / "imgs")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GNDGL_CACHE", str(tmp_path / "cache"))


def feed(source, mode: str, augment=None, *, workers: int = 2, shape=(3, 32, 32), **data):
    return load_feed(FeedRequest(str(source), augment, shape, CPU, DataFeed(mode=mode, workers=workers, **data)))


def batches(f, augment=None, *, epoch: int = 1, start: int = 0, train: bool = True, bs: int = 8):
    aug = augment is not None
    return list(f.batches(batch_size=bs, seed=7, epoch=epoch, start_step=start, train=train, augment=aug,
                          pad=augment.crop_pad if aug else 0, flip=bool(aug and augment.flip)))


def same(a, b) -> bool:
    return len(a) == len(b) and all(s == t and torch.equal(x, u) and torch.equal(y, v)
                                    for (s, x, y), (t, u, v) in zip(a, b))


# ───────────── streamed == in memory ─────────────

@pytest.mark.parametrize("form", ["folder", "tar", "tar.gz"])
@pytest.mark.parametrize("augment", [None, Augment()], ids=["no-aug", "pad-crop-flip"])
def test_streamed_batches_equal_in_memory_batches(folder, tmp_path, form, augment):
    src = folder if form == "folder" else make_tar(folder, tmp_path / f"imgs.{form}")
    mem, stream = feed(src, "memory", augment), feed(src, "stream", augment)
    assert stream.mode == "stream" and mem.mode == "memory"
    assert stream.classes == mem.classes == list(CLASSES) and stream.mean == mem.mean and stream.std == mem.std
    a, b = batches(mem, augment), batches(stream, augment)
    assert len(a) == 30 // 8 and same(a, b)
    assert same(batches(mem, train=False), batches(stream, train=False))  # eval: in order, short last batch


def test_random_resized_crop_boxes_follow_torchvisions_rule(tmp_path):
    """The crop box from the step's uniforms, recomputed here from torchvision's get_params in float64."""
    u, flips = rrc_draws(64, seed=3, epoch=2, step=5)
    again = rrc_draws(64, seed=3, epoch=2, step=5)
    assert torch.equal(u, again[0]) and torch.equal(flips, again[1]) and 10 < int(flips.sum()) < 54
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for k, (h, w) in enumerate([(40, 60), (100, 30), (224, 224), (5, 300)] * 16):
        ref = None
        for a, b, c, d in u[k].double().tolist():
            area = h * w * (scale[0] + a * (scale[1] - scale[0]))
            ar = math.exp(math.log(ratio[0]) + b * (math.log(ratio[1]) - math.log(ratio[0])))
            cw, ch = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
            if 0 < cw <= w and 0 < ch <= h:
                ref = (math.floor(c * (h - ch + 1)), math.floor(d * (w - cw + 1)), ch, cw)
                break
        if ref is None:  # torchvision's fallback: the centre crop at the nearest allowed ratio
            cw, ch = (w, round(w / ratio[0])) if w / h < ratio[0] else (round(h * ratio[1]), h) \
                if w / h > ratio[1] else (w, h)
            ref = ((h - ch) // 2, (w - cw) // 2, ch, cw)
        assert rrc_box(h, w, u[k], scale, ratio) == ref


def test_random_resized_crop_streamed_equals_in_memory_and_reference(folder, tmp_path):
    aug = Augment(random_resized_crop=RandomResizedCrop(size=24, scale=(0.3, 1.0), eval_resize=28))
    assert aug.crop_pad == 0
    mem, stream = feed(folder, "memory", aug, shape=(3, 24, 24)), feed(folder, "stream", aug, shape=(3, 24, 24))
    a, b = batches(mem, aug), batches(stream, aug)
    assert same(a, b) and a[0][1].shape == (8, 3, 24, 24)
    # sample 0 of step 1 by hand: its image, box, torchvision resize and flip
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(stable_seed("perm", 7, 1)))
    j = int(perm[8])
    img = TF.pil_to_tensor(Image.open(sorted((folder / "train" / CLASSES[j // 10]).glob("*.jpg"))[j % 10]))
    u, flips = rrc_draws(8, seed=7, epoch=1, step=1)
    top, left, ch, cw = rrc_box(32, 32, u[0], (0.3, 1.0), (3 / 4, 4 / 3))
    ref = TF.resize(img[:, top:top + ch, left:left + cw], [24, 24], antialias=True)
    ref = ref.flip(-1) if flips[0] else ref
    x = b[1][1][0].double() * torch.tensor(stream.std).double().view(3, 1, 1) * 255 \
        + torch.tensor(stream.mean).double().view(3, 1, 1) * 255
    assert torch.allclose(x, ref.double(), atol=1e-3)
    # evaluation: resize the shorter side to 28, centre crop 24
    ev = batches(stream, aug, train=False)[0][1][0].double() * torch.tensor(stream.std).double().view(3, 1, 1) * 255 \
        + torch.tensor(stream.mean).double().view(3, 1, 1) * 255
    img0 = TF.pil_to_tensor(Image.open(folder / "test" / "cat" / "000.jpg"))
    assert torch.allclose(ev, TF.center_crop(TF.resize(img0, [28], antialias=True), [24, 24]).double(), atol=1e-3)


# ───────────── order: workers, resume ─────────────

@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_batches_do_not_depend_on_the_number_of_workers(folder):
    aug = Augment()
    runs = [batches(feed(folder, "stream", aug, workers=w), aug) for w in (0, 1, 2, 4)]
    assert all(same(runs[0], r) for r in runs[1:])


def test_a_resumed_epoch_reads_the_same_batches(folder):
    aug = Augment()
    f = feed(folder, "stream", aug)
    whole, tail = batches(f, aug, epoch=3), batches(f, aug, epoch=3, start=2)
    assert [s for s, _, _ in tail] == [2] and same(whole[2:], tail)
    assert not torch.equal(batches(f, aug, epoch=4)[0][2], whole[0][2])  # another epoch, another order


def test_auto_keeps_a_small_set_in_memory_and_streams_mixed_sizes(folder, tmp_path):
    small = feed(folder, "auto")
    assert small.mode == "memory" and "fits in" in small.note
    mixed = make_folder(tmp_path / "mixed", n_train=4, n_eval=2, size=None, eval_name="val")
    aug = Augment(random_resized_crop=RandomResizedCrop(size=16))
    f = feed(mixed, "auto", aug, shape=(3, 16, 16))
    assert f.mode == "stream" and "differ in size" in f.note
    assert batches(f, aug, bs=4)[0][1].shape == (4, 3, 16, 16)
    assert batches(f, aug, bs=4, train=False)[-1][1].shape == (2, 3, 16, 16)


# ───────────── bad input ─────────────

def test_bad_folders_name_the_path_and_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*no images under train/<class>/<image>"):
        feed(tmp_path / "empty", "stream")
    one = make_folder(tmp_path / "one", n_train=2, n_eval=1, classes=("cat",))
    with pytest.raises(DataError, match=r"one.* has one class \('cat'\).*two or more"):
        feed(one, "stream")
    odd = make_folder(tmp_path / "odd", n_train=2, n_eval=1)
    make_folder(odd, n_train=0, n_eval=1, eval_name="val", classes=("cat", "yak"))
    (odd / "test").rename(tmp_path / "unused")
    with pytest.raises(DataError, match=r"odd.*class lists of train/ and val/ differ.*'yak'.*'dog'"):
        feed(odd, "stream")


def test_an_unreadable_image_fails_with_its_path_or_is_skipped(folder, tmp_path):
    bad = make_folder(tmp_path / "bad", n_train=4, n_eval=2)
    (bad / "train" / "dog" / "001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match=r"dog/001.jpg.*on_bad_image: skip"):
        batches(feed(bad, "stream"), bs=4)
    logged = []
    f = load_feed(FeedRequest(str(bad), None, (3, 32, 32), CPU, DataFeed(mode="stream", workers=1,
                                                                         on_bad_image="skip"), on_log=logged.append))
    got = batches(f, bs=4)
    assert sum(len(y) for _, _, y in got) == 11 and f.skipped == 1 and f.summary()["bad_images_skipped"] == 1
    assert any("dog/001.jpg" in r["text"] for r in logged)


# ───────────── the CLI ─────────────

def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "NO_COLOR": "1", "GNDGL_CACHE": str(cwd / "c")}
    return subprocess.run([sys.executable, "-m", "gndgl_cli.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_gndgl_train_streams_a_folder_and_refuses_a_bad_image(folder, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(tiny_spec("tiny_stream", f"train:\n  dataset: {folder}\n  batch_size: 8\n  epochs: 1\n",
                              num_classes=3, deep=False))
    ok = _cli(tmp_path, "train", str(spec), "--set", "train.data.mode=stream", "--set", "train.data.workers=1",
              "--max-steps", "2", "--run-dir", "r", "--no-tensorboard")
    assert ok.returncode == 0, ok.stderr
    assert "data: streamed by 1 worker process" in ok.stdout + ok.stderr
    bad = make_folder(tmp_path / "bad", n_train=4, n_eval=2)
    (bad / "train" / "emu" / "000.jpg").write_bytes(b"truncated")
    no = _cli(tmp_path, "train", str(spec), "--dataset", str(bad), "--set", "train.data.mode=stream",
              "--set", "train.data.workers=1", "--batch-size", "4", "--run-dir", "r2", "--no-tensorboard")
    text = no.stdout + no.stderr
    assert no.returncode == 2 and "emu/000.jpg" in text and "on_bad_image: skip" in text and "Traceback" not in text


@pytest.mark.skipif(not os.environ.get("GNDGL_CIFAR10_JPEG"), reason="GNDGL_CIFAR10_JPEG is not set (the CIFAR-10 "
                    "JPEG copy, DESIGN.md §6)")
def test_cifar10_jpeg_copy_streamed_equals_in_memory(tmp_path):
    aug = Augment()
    kw = dict(augment=aug, shape=(3, 32, 32), device=CPU, limit_train=512, limit_test=256)
    mem = load_feed(FeedRequest("cifar10", data=DataFeed(mode="memory"), **kw))
    stream = load_feed(FeedRequest("cifar10", data=DataFeed(mode="stream", workers=2), **kw))
    for a in (None, aug):
        assert same(batches(mem, a, bs=64)[:3], batches(stream, a, bs=64)[:3])


def test_a_streamed_run_stopped_mid_epoch_resumes_to_the_same_weights(folder, tmp_path):
    from safetensors.torch import load_file

    from gndgl_compiler import compile_spec
    from gndgl_compiler.runtime.train import TrainOptions, train_artifact

    spec = tmp_path / "s.yaml"
    spec.write_text(tiny_spec("tiny_resume", f"train:\n  dataset: {folder}\n  batch_size: 8\n  epochs: 2\n"
                              "  data: {mode: stream, workers: 1}\n", num_classes=3, deep=False))
    art = compile_spec(str(spec), tmp_path / "art").path  # a path: each run loads its own modules
    whole = train_artifact(art, TrainOptions(run_dir=str(tmp_path / "a"), tensorboard=False))
    part = train_artifact(art, TrainOptions(run_dir=str(tmp_path / "b"), tensorboard=False, max_steps=4))
    assert whole["steps"] == 6 and part["steps"] == 4 and not part["complete"]  # stopped at step 1 of epoch 2
    done = train_artifact(None, TrainOptions(resume=str(tmp_path / "b"), tensorboard=False))
    assert done["complete"] and done["data_mode"] == "stream"
    a, b = (load_file(str(tmp_path / r / "weights.safetensors")) for r in ("a", "b"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
