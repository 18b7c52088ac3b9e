"""Checkpoints (atomic, pickle-free, verified) and the metrics log."""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
import random
import stat

import pytest
import torch

from gndgl_compiler.errors import ArtifactError, GndglError, TrainingError
from gndgl_compiler import fsio
from gndgl_compiler.runtime.checkpoint import store as ck
from gndgl_compiler.runtime.checkpoint import directory as ckd
from gndgl_compiler.runtime.checkpoint import rng
from gndgl_compiler.runtime.checkpoint import codec as state_codec
from gndgl_compiler.runtime.metrics import MetricsLogger, read_metrics, truncate_metrics

# ---------------------------------------------------------------- flatten / unflatten


def assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        assert all(type(k1) is type(k2) for k1, k2 in zip(a, b))
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_flatten_round_trip_keeps_types():
    obj = {
        "ints": {0: "a", 1: 2, -3: None},
        "mixed": {"x": 1, 2: 3.5, (1, "t"): True, "$tensor": "not a marker"},
        "tuple": (1, (2.0, [3, {"k": torch.tensor(1)}])),
        "floats": [float("inf"), float("-inf"), float("nan"), -0.0, 1e-300],
        "scalar": torch.tensor(2.5),
        "dtypes": [torch.arange(3, dtype=dt)
                   for dt in (torch.int64, torch.int8, torch.uint8, torch.float16, torch.bfloat16, torch.float64)],
        "bool": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "big": 2**62,
        "flag": False,
    }
    tensors, meta = state_codec.flatten_state(obj)
    text = json.dumps(meta, allow_nan=False)  # strict JSON
    back = state_codec.unflatten_state(tensors, json.loads(text))
    assert_same(obj, back)


def test_flatten_rejects_unknown_types():
    with pytest.raises(ArtifactError, match="object"):
        state_codec.flatten_state({"a": [object()]})


def test_save_load_round_trip_through_files(tmp_path):
    weights = {"w": torch.randn(3, 4), "b": torch.randn(4)[::2]}  # non-contiguous view
    shared = torch.randn(10)
    state = {"step": 5, "views": [shared[:3], shared[3:]], "lr": 0.1, "rng": rng.rng_state()}
    ck.save_checkpoint(tmp_path, "step-5", tensors=weights, state=state)
    tensors, back = ck.load_checkpoint(tmp_path, "step-5")
    assert sorted(tensors) == sorted(weights)
    for k, v in weights.items():
        assert_same(v.contiguous(), tensors[k])
    assert_same(state, back)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def make_opt(kind, model):
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9**e)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    return opt, sched


def train_steps(model, opt, sched, n):
    for _ in range(n):
        x = torch.randn(5, 4)
        y = torch.randint(0, 3, (5,))
        keep = random.random()  # python RNG must also be restored
        loss = torch.nn.functional.cross_entropy(model(x), y) * (1 + keep)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_resume_continues_bit_for_bit(tmp_path, kind):
    model = make_model()
    opt, sched = make_opt(kind, model)
    random.seed(1)
    train_steps(model, opt, sched, 2)
    state = {"step": 2, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng.rng_state()}
    ck.save_checkpoint(tmp_path, "step-2", tensors=model.state_dict(), state=state)
    train_steps(model, opt, sched, 3)

    torch.manual_seed(123)  # disturb the generators
    random.seed(123)
    model2 = make_model()
    opt2, sched2 = make_opt(kind, model2)
    tensors, back = ck.load_checkpoint(tmp_path, "step-2")
    model2.load_state_dict(tensors)
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["scheduler"])
    rng.set_rng_state(back["rng"])
    train_steps(model2, opt2, sched2, 3)

    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert sched.get_last_lr() == sched2.get_last_lr()


# ---------------------------------------------------------------- corruption


def save_two(tmp_path):
    for step in (1, 2):
        ck.save_checkpoint(tmp_path, f"step-{step}", tensors={"w": torch.full((64,), float(step))},
                           state={"step": step})


def test_tampered_safetensors_detected(tmp_path):
    save_two(tmp_path)
    path = tmp_path / "step-2.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="step-2.safetensors"):
        ck.load_checkpoint(tmp_path, "step-2")


def test_truncated_and_missing_files_detected(tmp_path):
    save_two(tmp_path)
    st = tmp_path / "step-2.safetensors"
    st.write_bytes(st.read_bytes()[:40])
    with pytest.raises(ArtifactError, match="truncated"):
        ck.load_checkpoint(tmp_path, "step-2")
    st.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        ck.load_checkpoint(tmp_path, "step-2")
    js = tmp_path / "step-1.json"
    js.write_text(js.read_text()[:20])
    with pytest.raises(ArtifactError, match="step-1.json"):
        ck.load_checkpoint(tmp_path, "step-1")
    with pytest.raises(ArtifactError, match="does not exist"):
        ck.load_checkpoint(tmp_path, "nope")


def test_list_orders_by_step_not_name(tmp_path):
    for step in (10, 9, 100):
        ck.save_checkpoint(tmp_path, f"s{step}", tensors={}, state={"step": step})
    (tmp_path / "config.json").write_text('{"unrelated": true}')
    assert ckd.list_checkpoints(tmp_path) == ["s9", "s10", "s100"]
    assert ckd.list_checkpoints(tmp_path / "missing") == []


def test_latest_valid_falls_back_when_newest_truncated(tmp_path):
    save_two(tmp_path)
    st = tmp_path / "step-2.safetensors"
    st.write_bytes(st.read_bytes()[:-8])
    with pytest.warns(UserWarning, match="step-2"):
        found = ckd.latest_valid_checkpoint(tmp_path)
    assert found is not None and found.name == "step-1"
    assert found.state == {"step": 1} and torch.equal(found.tensors["w"], torch.full((64,), 1.0))


def test_latest_valid_none(tmp_path):
    assert ckd.latest_valid_checkpoint(tmp_path) is None


def test_prune_keeps_newest_and_newest_valid(tmp_path):
    for step in range(1, 6):
        ck.save_checkpoint(tmp_path, f"step-{step}", tensors={"w": torch.zeros(2)}, state={"step": step})
    for step in (4, 5):  # both newest are corrupt
        p = tmp_path / f"step-{step}.safetensors"
        p.write_bytes(p.read_bytes()[:-1])
    deleted = ckd.prune_checkpoints(tmp_path, keep=2)
    assert sorted(deleted) == ["step-1", "step-2"]
    assert ckd.list_checkpoints(tmp_path) == ["step-3", "step-4", "step-5"]
    assert not (tmp_path / "step-1.safetensors").exists()


# ---------------------------------------------------------------- write failures


def test_read_only_directory_gives_clean_error(tmp_path):
    save_two(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    os.chmod(tmp_path, stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("running as root: chmod does not make the directory read-only")
        with pytest.raises(TrainingError, match=str(tmp_path)):
            ck.save_checkpoint(tmp_path, "step-3", tensors={"w": torch.zeros(3)}, state={"step": 3})
    finally:
        os.chmod(tmp_path, stat.S_IRWXU)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert ckd.latest_valid_checkpoint(tmp_path).name == "step-2"


class FullDisk(fsio.FileSystem):
    def fsync(self, fd, path):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_removes_temp_and_keeps_old_file(tmp_path):
    target = tmp_path / "file.json"
    fsio.atomic_write_text(target, "old")
    with fsio.use(FullDisk()), pytest.raises(TrainingError, match="No space left on device") as info:
        fsio.atomic_write_text(target, "new")
    assert str(target) in str(info.value)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_atomic_write_error_class_and_missing_dir(tmp_path):
    with pytest.raises(ArtifactError, match="nodir"):
        fsio.atomic_write_bytes(tmp_path / "nodir" / "f.bin", b"x", error=ArtifactError)


# ---------------------------------------------------------------- metrics


def test_metrics_write_read_and_truncated_tail(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log({"kind": "train", "step": 1, "loss": torch.tensor(0.5), "acc": 0.25})
        log.log({"kind": "train", "step": 2, "loss": 0.4, "lr": float("nan")})
        with pytest.raises(TypeError):
            log.log({"kind": "train", "step": 3, "loss": torch.ones(2)})
    records = read_metrics(tmp_path)
    assert records[0] == {"kind": "train", "step": 1, "loss": 0.5, "acc": 0.25}
    assert records[1]["step"] == 2 and math.isnan(records[1]["lr"])
    assert len(records) == 2

    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # killed mid-line
    assert len(read_metrics(tmp_path)) == 2

    with MetricsLogger(tmp_path, tensorboard=False) as log:  # repairs the tail before appending
        log.log({"kind": "eval", "step": 3, "acc": 0.9})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_metrics_broken_middle_line_and_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="metrics.jsonl"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ArtifactError, match="line 2"):
        read_metrics(tmp_path)


def test_truncate_metrics(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 6):
            log.log({"kind": "train", "step": step, "loss": 1.0 / step})
        log.log({"kind": "note", "value": 1})
    assert truncate_metrics(tmp_path, 3) == 2
    assert [r.get("step") for r in read_metrics(tmp_path)] == [1, 2, 3, None]
    assert truncate_metrics(tmp_path / "fresh", 0) == 0


def test_metrics_tensorboard_required_but_missing(tmp_path):
    try:  # what MetricsLogger needs: both import
        importlib.import_module("tensorboard")
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        with pytest.raises(GndglError, match="pip install tensorboard"):
            MetricsLogger(tmp_path, tensorboard=True)
    else:
        with MetricsLogger(tmp_path, tensorboard=True) as log:
            log.log({"kind": "train", "step": 1, "loss": 0.5})
        assert (tmp_path / "tensorboard").is_dir()


def test_metrics_scalars_go_to_tensorboard_writer(tmp_path):
    calls = []

    class FakeWriter:
        def add_scalar(self, tag, value, global_step=None):
            calls.append((tag, value, global_step))

        def close(self):
            calls.append("closed")

    with MetricsLogger(tmp_path, writer=FakeWriter()) as log:
        log.log({"kind": "eval", "step": 7, "acc": torch.tensor(0.75), "note": "x"})
    assert calls == [("eval/acc", 0.75, 7), "closed"]
