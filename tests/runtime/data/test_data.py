"""Tests of gndgl_compiler.runtime.data.sources, .data_cache, .data_folder and .batches: sources, cache,
batching and augmentation."""

from __future__ import annotations

import gzip
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gndgl_compiler.errors import DataError
from gndgl_compiler.runtime.data.batches import (Batches, augment, augment_params, batch_indices, epoch_permutation,
                                            normalize, steps_per_epoch)
from gndgl_compiler.runtime.data.sources import load_dataset, read_idx

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def syn():
    return load_dataset("synthetic", synthetic={"n_train": 96, "n_test": 40, "num_classes": 4, "shape": (3, 8, 8)})


# ───────────── synthetic ─────────────

def test_synthetic_shapes_and_determinism(syn):
    assert syn.train_x.shape == (96, 3, 8, 8) and syn.train_x.dtype == torch.uint8 and syn.train_x.is_contiguous()
    assert syn.train_y.shape == (96,) and syn.train_y.dtype == torch.int64
    assert syn.test_x.shape == (40, 3, 8, 8) and syn.num_classes == 4 and len(syn.classes) == 4
    assert syn.input_shape == (3, 8, 8) and len(syn.mean) == len(syn.std) == 3
    assert set(syn.train_y.tolist()) == {0, 1, 2, 3}
    again = load_dataset("synthetic", synthetic={"n_train": 96, "n_test": 40, "num_classes": 4, "shape": (3, 8, 8)})
    assert torch.equal(syn.train_x, again.train_x) and torch.equal(syn.test_y, again.test_y)
    other = load_dataset("synthetic", synthetic={"n_train": 96, "seed": 1, "shape": (3, 8, 8)})
    assert not torch.equal(syn.train_x, other.train_x)
    # normalised train data has ~zero mean / unit std per channel
    z = normalize(syn.train_x, syn.mean, syn.std, torch.float64)
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(z.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-6)


def test_synthetic_is_learnable(syn):
    # nearest class mean on the train set classifies the test set well above chance
    protos = torch.stack([syn.train_x[syn.train_y == k].float().mean(0) for k in range(4)])
    d = ((syn.test_x.float()[:, None] - protos[None]) ** 2).flatten(2).sum(-1)
    assert (d.argmin(1) == syn.test_y).float().mean() > 0.9


def test_synthetic_bad_options():
    with pytest.raises(DataError, match="unknown synthetic option"):
        load_dataset("synthetic", synthetic={"n_trian": 3})
    with pytest.raises(DataError, match="positive"):
        load_dataset("synthetic", synthetic={"n_train": 0})


def test_synthetic_fits_any_spec_batch():
    """``--dataset synthetic`` smoke-tests a spec whatever its batch size (resnet32_k8g4 uses 1024):
    at least two batches of training images, and the same data when training and evaluating."""
    from types import SimpleNamespace

    from gndgl_compiler.runtime.step.devices import synthetic_like

    plan = SimpleNamespace(input_shape=[3, 32, 32], num_classes=10)
    big = load_dataset("synthetic", synthetic=synthetic_like(plan, 1024))
    assert len(big.train_y) == 2048 and steps_per_epoch(len(big.train_y), 1024) == 2
    again = load_dataset("synthetic", synthetic=synthetic_like(plan, 1024), limit_train=1)
    assert torch.equal(again.test_x, big.test_x) and again.mean == big.mean
    assert len(load_dataset("synthetic", synthetic=synthetic_like(plan, 64)).train_y) == 512


def test_bundle_to_and_limits(syn):
    moved = syn.to("cpu")
    assert torch.equal(moved.train_x, syn.train_x) and moved.classes == syn.classes
    lim = load_dataset("synthetic", limit_train=50, limit_test=7)
    full = load_dataset("synthetic")
    assert len(lim.train_x) == 50 and len(lim.test_y) == 7
    assert lim.mean == full.mean  # statistics come from the full set
    # a subset of the original rows, classes mixed, deterministic
    assert len(set(lim.train_y.tolist())) > 5
    assert torch.equal(lim.train_x, load_dataset("synthetic", limit_train=50).train_x)
    with pytest.raises(DataError, match="limit_train"):
        load_dataset("synthetic", limit_train=0)


# ───────────── permutation, augmentation, normalisation ─────────────

def test_permutation_and_batch_indices():
    p = epoch_permutation(100, 3, 2)
    assert p.dtype == torch.int64 and torch.equal(p, epoch_permutation(100, 3, 2))
    assert torch.equal(p.sort().values, torch.arange(100))
    assert not torch.equal(p, epoch_permutation(100, 3, 3)) and not torch.equal(p, epoch_permutation(100, 4, 2))
    assert steps_per_epoch(100, 32) == 3 and steps_per_epoch(100, 32, drop_last=False) == 4
    b = batch_indices(100, 32, 3, 2)
    assert len(b) == 3 and all(len(i) == 32 for i in b) and torch.equal(torch.cat(b), p[:96])
    assert len(batch_indices(100, 32, 3, 2, drop_last=False)[-1]) == 4
    with pytest.raises(DataError):
        steps_per_epoch(10, 0)


def _reference_augment(x, dy, dx, mask, pad):
    xp = F.pad(x, (pad,) * 4)
    h, w = x.shape[2:]
    out = []
    for i in range(len(x)):
        crop = xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out.append(crop.flip(-1) if mask[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("pad,flip", [(4, True), (2, False), (0, True), (3, True)])
def test_augment_matches_per_image_reference(syn, pad, flip):
    x = syn.train_x[:64]
    out = augment(x, seed=5, epoch=1, step=7, pad=pad, flip=flip)
    assert out.shape == x.shape and out.dtype == torch.uint8
    dy, dx, mask = augment_params(64, seed=5, epoch=1, step=7, pad=pad, flip=flip)
    assert torch.equal(out, _reference_augment(x, dy, dx, mask, pad))
    assert torch.equal(out, augment(x, seed=5, epoch=1, step=7, pad=pad, flip=flip))
    if flip:
        assert 0 < mask.sum() < 64
    if pad or flip:
        assert not torch.equal(out, augment(x, seed=5, epoch=1, step=8, pad=pad, flip=flip))


def test_augment_identity_and_errors(syn):
    x = syn.train_x[:16]
    assert torch.equal(augment(x, seed=1, epoch=0, step=0, pad=0, flip=False), x)
    with pytest.raises(DataError):
        augment(x[0], seed=1, epoch=0, step=0)


def test_normalize_roundtrip(syn):
    z = normalize(syn.train_x, syn.mean, syn.std)
    assert z.dtype == torch.float32 and z.shape == syn.train_x.shape
    back = z * torch.tensor(syn.std).view(-1, 1, 1) + torch.tensor(syn.mean).view(-1, 1, 1)  # the inverse
    assert torch.allclose(back, syn.train_x.float() / 255, atol=1e-5)
    assert normalize(syn.train_x[0], syn.mean, syn.std, torch.bfloat16).dtype == torch.bfloat16


# ───────────── Batches ─────────────

def test_batches_resume_equals_tail(syn):
    full = list(Batches(syn, batch_size=16, seed=3, epoch=2))
    assert len(full) == 6 == len(Batches(syn, batch_size=16, seed=3, epoch=2))
    tail = Batches(syn, batch_size=16, seed=3, epoch=2, start_step=4)
    assert len(tail) == 2
    for (s1, x1, y1), (s2, x2, y2) in zip(full[4:], tail, strict=True):
        assert s1 == s2 and torch.equal(x1, x2) and torch.equal(y1, y2)
    step, x, y = full[0]
    assert step == 0 and x.dtype == torch.float32 and x.shape == (16, 3, 8, 8) and y.shape == (16,)
    idx = batch_indices(96, 16, 3, 2)[0]
    assert torch.equal(y, syn.train_y[idx])
    ref = normalize(augment(syn.train_x[idx], seed=3, epoch=2, step=0), syn.mean, syn.std)
    assert torch.equal(x, ref)


def test_batches_test_mode_and_options(syn):
    test = list(Batches(syn, batch_size=16, seed=0, epoch=0, train=False))
    assert [len(y) for _, _, y in test] == [16, 16, 8]
    assert torch.equal(torch.cat([y for _, _, y in test]), syn.test_y)
    assert torch.equal(test[0][1], normalize(syn.test_x[:16], syn.mean, syn.std))
    plain = next(iter(Batches(syn, batch_size=16, seed=0, epoch=0, augment=False, channels_last=True)))[1]
    assert plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, normalize(syn.train_x[epoch_permutation(96, 0, 0)[:16]], syn.mean, syn.std))
    with pytest.raises(DataError, match="start step"):
        Batches(syn, batch_size=16, seed=0, epoch=0, start_step=7)
    with pytest.raises(DataError, match="larger than"):
        Batches(syn, batch_size=200, seed=0, epoch=0)


# ───────────── IDX ─────────────

def _write_idx(path: Path, arr: np.ndarray, gz: bool):
    raw = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _make_idx_set(folder: Path, gz: bool, n=(20, 8), hw=28):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    ext = ".gz" if gz else ""
    for split, count in zip(("train", "t10k"), n):
        x = rng.integers(0, 256, (count, hw, hw), dtype=np.uint8)
        y = rng.integers(0, 10, (count,), dtype=np.uint8)
        _write_idx(folder / f"{split}-images-idx3-ubyte{ext}", x, gz)
        _write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", y, gz)
        out[split] = (x, y)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_idx_parsing(tmp_path, gz):
    arrays = _make_idx_set(tmp_path / "mnist", gz)
    x = read_idx(tmp_path / "mnist" / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    assert x.shape == (20, 28, 28) and np.array_equal(x, arrays["train"][0])
    b = load_dataset("mnist", root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert b.train_x.shape == (20, 1, 28, 28) and b.test_x.shape == (8, 1, 28, 28)
    assert np.array_equal(b.train_x[:, 0].numpy(), arrays["train"][0])
    assert np.array_equal(b.test_y.numpy(), arrays["t10k"][1].astype(np.int64))
    assert b.mean == (0.1307,) and b.num_classes == 10


def test_idx_bad_file(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "trunc", np.zeros((4, 3, 3), np.uint8), False)
    (tmp_path / "trunc").write_bytes((tmp_path / "trunc").read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "trunc")


def test_input_shape_adaptation(tmp_path):
    _make_idx_set(tmp_path / "mnist", True)
    b = load_dataset("mnist", root=str(tmp_path), cache_dir=str(tmp_path / "c"), input_shape=(3, 32, 32))
    assert b.input_shape == (3, 32, 32) and b.mean == (0.1307,) * 3 and b.std == (0.3081,) * 3
    raw = load_dataset("mnist", root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert torch.equal(b.train_x[:, 1, 2:30, 2:30], raw.train_x[:, 0])
    assert b.train_x[:, :, :2].sum() == 0 and b.train_x[:, :, :, 30:].sum() == 0
    with pytest.raises(DataError, match="1x28x28.*1x16x16"):
        load_dataset("mnist", root=str(tmp_path), cache_dir=str(tmp_path / "c"), input_shape=(1, 16, 16))
    with pytest.raises(DataError, match="3x8x8.*1x8x8"):
        load_dataset("synthetic", synthetic={"shape": (3, 8, 8)}, input_shape=(1, 8, 8))


def test_fashion_mnist_system_copy(tmp_path, monkeypatch):
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FMNIST_DIR} not present (apt-get install dataset-fashion-mnist)")
    monkeypatch.setenv("GNDGL_DATA", str(tmp_path / "nothing"))
    b = load_dataset("fashion-mnist", cache_dir=str(tmp_path), limit_train=500, limit_test=100)
    assert b.train_x.shape == (500, 1, 28, 28) and b.test_x.shape == (100, 1, 28, 28)
    assert b.classes[0] == "T-shirt/top" and b.num_classes == 10 and b.mean == (0.2860,)


# ───────────── image folders and the cache ─────────────

def _make_png_folder(root: Path, classes=("cat", "dog", "emu"), per=(4, 2), size=(6, 5)):
    from PIL import Image
    rng = np.random.default_rng(1)
    for split, n in zip(("train", "test"), per):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i:03d}.png")
    return root


def test_image_folder_dir_and_tar(tmp_path, monkeypatch):
    from PIL import Image
    folder = _make_png_folder(tmp_path / "pets")
    b = load_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
    assert b.name == "pets" and b.classes == ["cat", "dog", "emu"] and b.num_classes == 3
    assert b.train_x.shape == (12, 3, 6, 5) and b.test_x.shape == (6, 3, 6, 5)
    assert b.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    first = torch.from_numpy(np.array(Image.open(folder / "train" / "cat" / "000.png"))).permute(2, 0, 1)
    assert torch.equal(b.train_x[0], first)
    f = b.train_x.double() / 255
    assert np.allclose(b.mean, f.mean((0, 2, 3)).tolist())
    assert np.allclose(b.std, f.std((0, 2, 3), unbiased=False).tolist())

    tar_path = tmp_path / "pets.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(folder, arcname="pets")  # single top-level folder inside
    # second load of the same archive must come from the cache: the decoder would fail now
    t1 = load_dataset(f"imagefolder:{tar_path}", cache_dir=str(tmp_path / "cache"))
    assert torch.equal(t1.train_x, b.train_x) and torch.equal(t1.test_y, b.test_y) and t1.classes == b.classes

    decoded = []  # decoding reports its progress (at least once, at the end); a cache hit decodes nothing
    t2 = load_dataset(str(tar_path), cache_dir=str(tmp_path / "cache"), progress=decoded.append)
    assert decoded == [], "decoded again although cached"
    fresh = []
    load_dataset(str(tar_path), cache_dir=str(tmp_path / "cache2"), progress=fresh.append)
    assert fresh and fresh[-1].done == fresh[-1].total == 18
    assert torch.equal(t2.train_x, b.train_x) and t2.mean == t1.mean and t2.classes == b.classes
    assert len(list((tmp_path / "cache").glob("*.tmp"))) == 0


def test_corrupt_cache_is_rebuilt(tmp_path):
    folder = _make_png_folder(tmp_path / "pets")
    cache = tmp_path / "cache"
    b = load_dataset(str(folder), cache_dir=str(cache))
    (entry,) = cache.glob("*.safetensors")
    entry.write_bytes(b"garbage" * 10)
    again = load_dataset(str(folder), cache_dir=str(cache))
    assert torch.equal(again.train_x, b.train_x)
    assert entry.stat().st_size > 100


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="train/<class>"):
        load_dataset(str(tmp_path / "empty"), cache_dir=str(tmp_path / "c"))
    folder = _make_png_folder(tmp_path / "mixed")
    from PIL import Image
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(folder / "test" / "cat" / "big.png")
    with pytest.raises(DataError, match="one size"):
        load_dataset(str(folder), cache_dir=str(tmp_path / "c"))
    (folder / "test" / "cat" / "big.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode"):
        load_dataset(str(folder), cache_dir=str(tmp_path / "c"))


# ───────────── errors ─────────────

def test_unknown_name_and_missing_files(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="valid names are cifar10, cifar100, mnist, fashion-mnist, synthetic"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.tar.gz"))
    monkeypatch.setenv("GNDGL_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("GNDGL_CIFAR10_JPEG", raising=False)
    (tmp_path / "cifar").mkdir()
    (tmp_path / "m").mkdir()
    with pytest.raises(DataError, match="--data-root .* does not exist"):  # not silently looked for elsewhere
        load_dataset("mnist", root=str(tmp_path / "nope"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=str(tmp_path / "cifar"), cache_dir=str(tmp_path / "c"))
    msg = str(e.value)
    assert str(tmp_path / "cifar") in msg and "--download" in msg and "--data-root" in msg and ".tar.gz" in msg
    with pytest.raises(DataError) as e:
        load_dataset("mnist", root=str(tmp_path / "m"), cache_dir=str(tmp_path / "c"))
    assert "train-images-idx3-ubyte" in str(e.value) and str(tmp_path / "m") in str(e.value)


def test_cifar10_env_fallback_uses_image_folder(tmp_path, monkeypatch):
    folder = _make_png_folder(tmp_path / "cifarish", classes=("a", "b"))
    tar_path = tmp_path / "cifarish.tgz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(folder / "train", arcname="train")
        tf.add(folder / "test", arcname="test")
    monkeypatch.setenv("GNDGL_CIFAR10_JPEG", str(tar_path))
    (tmp_path / "none").mkdir()  # a --data-root without CIFAR-10: the copy used instead is named
    with pytest.warns(UserWarning, match=f"not in --data-root .*using the JPEG copy .*{tar_path.name}"):
        b = load_dataset("cifar10", root=str(tmp_path / "none"), cache_dir=str(tmp_path / "c"))
    assert b.name == "cifar10" and b.classes == ["a", "b"] and b.mean == (0.4914, 0.4822, 0.4465)
    assert load_dataset("cifar10", cache_dir=str(tmp_path / "c")).classes == ["a", "b"]  # no --data-root: no word


# ───────────── the real JPEG CIFAR-10 archive (opt-in) ─────────────

@pytest.mark.skipif(not os.environ.get("GNDGL_CIFAR10_JPEG"),
                    reason="set GNDGL_CIFAR10_JPEG=/path/cifar10-jpeg.tar.gz to test the real JPEG CIFAR-10 copy")
def test_cifar10_jpeg_archive(tmp_path_factory):
    path = os.environ["GNDGL_CIFAR10_JPEG"]
    cache = str(tmp_path_factory.mktemp("jpeg-cache"))
    b = load_dataset(path, cache_dir=cache, limit_train=2000, limit_test=500)
    assert b.train_x.shape == (2000, 3, 32, 32) and b.test_x.shape == (500, 3, 32, 32)
    assert b.num_classes == 10 and b.classes[0] == "airplane" and b.classes[-1] == "truck"
    assert abs(b.mean[0] - 0.49) < 0.01
    c = load_dataset("cifar10", root=str(tmp_path_factory.mktemp("no-cifar")), cache_dir=cache, limit_train=2000)
    assert torch.equal(c.train_x, b.train_x) and c.name == "cifar10"


def test_cifar_torchvision_copy_is_converted_and_cached(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    calls = []

    class FakeCIFAR10:
        base_folder = "cifar-10-batches-py"

        def __init__(self, root, train=True, download=False):
            calls.append(train)
            n = 6 if train else 4
            self.data = np.arange(n * 32 * 32 * 3, dtype=np.int64).reshape(n, 32, 32, 3).astype(np.uint8)
            self.targets = list(range(n))
            self.classes = [f"c{i}" for i in range(10)]

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    b = load_dataset("cifar10", root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert b.train_x.shape == (6, 3, 32, 32) and b.test_y.tolist() == [0, 1, 2, 3]
    assert torch.equal(b.train_x[1, 2], torch.from_numpy(FakeCIFAR10(None).data[1, :, :, 2]))
    assert b.mean == (0.4914, 0.4822, 0.4465) and b.classes[3] == "c3"
    again = load_dataset("cifar10", root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert len(calls) == 3 and torch.equal(again.train_x, b.train_x)  # 2 + the one above; none for the cache hit


def test_corrupt_torchvision_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("GNDGL_CIFAR10_JPEG", raising=False)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    with pytest.raises(DataError, match="cannot be read.*--download"):
        load_dataset("cifar10", root=str(tmp_path), cache_dir=str(tmp_path / "c"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare CPU and GPU batches")
def test_batches_device_independent(syn):
    cpu = list(Batches(syn, batch_size=16, seed=1, epoch=3))
    gpu = list(Batches(syn.to("cuda"), batch_size=16, seed=1, epoch=3))
    for (s1, x1, y1), (s2, x2, y2) in zip(cpu, gpu, strict=True):
        assert s1 == s2 and torch.equal(y1, y2.cpu()) and torch.allclose(x1, x2.cpu(), atol=1e-6)
