"""ImageNet-scale sources besides image folders: WebDataset-style shards (streamed), Tiny-ImageNet
and ImageNet32/64 numpy batches (in memory). Every source is generated here, small."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gndgl_compiler.errors import DataError
from gndgl_compiler.runtime.data.batches import stable_seed
from gndgl_compiler.runtime.data.sources import load_dataset
from gndgl_compiler.runtime.data.select import FeedRequest, load_feed
from gndgl_compiler.runtime.data.shards import expand_braces
from gndgl_compiler.spec.models import DataFeed

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GNDGL_CACHE", str(tmp_path / "cache"))


def jpeg(px: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_shards(root: Path, *, gz: bool = False, drop_label: str | None = None) -> list[tuple[bytes, int]]:
    """train-000..002 and val-000 shards of 3 classes; returns the train samples (bytes, label) in shard order."""
    rng, samples, ext = np.random.default_rng(1), [], ".tar.gz" if gz else ".tar"
    root.mkdir(parents=True, exist_ok=True)
    for name, n in [("train-000", 8), ("train-001", 8), ("train-002", 5), ("val-000", 6)]:
        with tarfile.open(root / f"{name}{ext}", "w:gz" if gz else "w") as tf:
            for i in range(n):
                key, label = f"{name}_{i:04d}", (i * 7 + len(name)) % 3
                data = jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
                add(tf, f"{key}.jpg", data)
                if key != drop_label:
                    add(tf, f"{key}.cls", f"{label}\n".encode())
                if name.startswith("train"):
                    samples.append((data, label))
    return samples


def test_brace_patterns_expand_like_a_shell():
    assert expand_braces("a-{00..02}.tar") == ["a-00.tar", "a-01.tar", "a-02.tar"]
    assert expand_braces("/d/{train-{0..1},val-{00..01}}.tar") == ["/d/train-0.tar", "/d/train-1.tar",
                                                                   "/d/val-00.tar", "/d/val-01.tar"]
    with pytest.raises(DataError, match="unclosed"):
        expand_braces("a-{00..02.tar")


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_shards_stream_each_sample_by_index(tmp_path, gz):
    samples = make_shards(tmp_path / "s", gz=gz)
    ext = ".tar.gz" if gz else ".tar"
    pattern = str(tmp_path / "s" / f"{{train-{{000..002}},val-000}}{ext}")
    f1, f2 = (load_feed(FeedRequest(pattern, None, (3, 32, 32), CPU, DataFeed(mode=m, workers=w)))
              for m, w in (("auto", 1), ("stream", 2)))
    assert f1.mode == "stream" and f1.classes == ["0", "1", "2"] and len(f1.train_y) == 21 and len(f1.test_y) == 6
    kw = dict(batch_size=4, seed=5, epoch=2, train=True, augment=False, pad=0, flip=False)
    a, b = list(f1.batches(**kw)), list(f2.batches(**kw))
    assert len(a) == 5 and all(torch.equal(x, u) and torch.equal(y, v) for (_, x, y), (_, u, v) in zip(a, b))
    # step 1 by hand: the epoch's permutation of the samples in shard order, decoded with PIL
    perm = torch.randperm(21, generator=torch.Generator().manual_seed(stable_seed("perm", 5, 2)))[4:8].tolist()
    mean, std = torch.tensor(f1.mean).view(3, 1, 1), torch.tensor(f1.std).view(3, 1, 1)
    for k, j in enumerate(perm):
        data, label = samples[j]
        px = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1).double()
        assert int(a[1][2][k]) == label
        assert torch.allclose(a[1][1][k].double() * std * 255 + mean * 255, px, atol=2.0)  # decoder rounding


def test_shards_refuse_missing_labels_files_and_memory_mode(tmp_path):
    make_shards(tmp_path / "s", drop_label="train-001_0003")
    pattern = str(tmp_path / "s" / "{train-{000..002},val-000}.tar")
    with pytest.raises(DataError, match=r"train-001.tar: sample 'train-001_0003' .*no .cls label"):
        load_feed(FeedRequest(pattern, None, (3, 32, 32), CPU, DataFeed(mode="stream")))
    with pytest.raises(DataError, match=r"1 of the 5 shards .* do not exist.*train-003.tar"):
        load_feed(FeedRequest(pattern.replace("002", "003"), None, (3, 32, 32), CPU, DataFeed(mode="stream")))
    with pytest.raises(DataError, match="read streamed only; set train.data.mode: stream"):
        load_feed(FeedRequest(pattern, None, (3, 32, 32), CPU, DataFeed(mode="memory")))


def test_tiny_imagenet_loads_in_memory_with_val_annotations(tmp_path):
    root, rng = tmp_path / "tiny-imagenet-200", np.random.default_rng(2)
    wnids = ["n02", "n01", "n03"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(3):
            px = rng.integers(0, 255, (16, 16) if (w, i) == ("n03", 1) else (16, 16, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / "train" / w / "images" / f"{w}_{i}.JPEG")
    lines = []
    for i, w in enumerate(["n03", "n01", "n02", "n01"]):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "val" / "images" / f"v{i}.JPEG")
        lines.append(f"v{i}.JPEG\t{w}\t0\t0\t15\t15")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    b = load_dataset(str(root))
    assert b.classes == ["n01", "n02", "n03"] and b.train_x.shape == (9, 3, 16, 16) and b.test_x.shape == (4, 3, 16, 16)
    assert b.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and b.test_y.tolist() == [2, 0, 1, 0]
    gray = b.train_x[7]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # the grayscale image joins as RGB
    f = load_feed(FeedRequest(str(root), None, (3, 16, 16), CPU, DataFeed(mode="stream", workers=0)))
    x = list(f.batches(batch_size=4, seed=0, epoch=0, train=False, augment=False))
    assert f.mode == "stream" and [int(v) for v in x[0][2]] == [2, 0, 1, 0]


@pytest.mark.parametrize("fmt", ["pickle", "npz"])
def test_imagenet32_batches_load_in_memory(tmp_path, fmt):
    rng, root = np.random.default_rng(3), tmp_path / "Imagenet32"
    root.mkdir()
    parts = []
    for name, n in [("train_data_batch_1", 5), ("train_data_batch_2", 4), ("val_data", 3)]:
        data = rng.integers(0, 255, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(1, 5, n)]
        parts.append((data, labels))
        if fmt == "npz":
            np.savez(root / f"{name}.npz", data=data, labels=np.array(labels))
        else:
            (root / name).write_bytes(pickle.dumps({"data": data, "labels": labels, "mean": data.mean(0)}))
    b = load_dataset(str(root))
    assert b.train_x.shape == (9, 3, 32, 32) and b.test_x.shape == (3, 3, 32, 32)
    assert b.train_y.tolist() == [v - 1 for v in parts[0][1] + parts[1][1]] and b.num_classes == 4
    # planar RGB: the first 1024 values are the red plane, row by row
    assert torch.equal(b.train_x[6, 0].reshape(-1), torch.from_numpy(parts[1][0][1, :1024]))
    assert torch.equal(b.train_x[6, 2, 31], torch.from_numpy(parts[1][0][1, 2048 + 31 * 32:]))


def test_imagenet_batches_refuse_anything_but_numpy_in_a_pickle(tmp_path):
    root = tmp_path / "evil"
    root.mkdir()
    (root / "train_data_batch_1").write_bytes(pickle.dumps({"data": os.getcwd, "labels": [1]}))
    (root / "val_data").write_bytes(b"")
    with pytest.raises(DataError, match=r"cannot read ImageNet batch .*train_data_batch_1.*posix.getcwd"):
        load_dataset(str(root))
