"""``load_run`` and ``gndgl export``: the trained network in hand.

The reference for every accuracy is ``gndgl eval`` (the executor's evaluation); every
exported file is loaded the way a user would load it and run on the same test images.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_spec import tiny_spec

from gndgl_cli.main import main
from gndgl_compiler import compile_spec, load_artifact, load_run
from gndgl_compiler.artifact import load_state_tensors
from gndgl_compiler.errors import RunError
from gndgl_compiler.runtime.data.batches import Batches
from gndgl_compiler.runtime.data.sources import STATS, load_dataset
from gndgl_compiler.runtime.step.executor import Executor
from gndgl_compiler.runtime.evaluation.inference import InputError
from gndgl_compiler.runtime.train import TrainOptions, read_run_record, train_artifact

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = tiny_spec("tiny_export", """
train:
  dataset: synthetic
  batch_size: 16
  epochs: 2
  augment: null
  optimizer: {kind: sgd, lr: 0.1, momentum: 0.9}
""", deep=False)
N_TEST = 64


def gndgl(*argv: str) -> tuple[int, str, str]:
    """Run the ``gndgl`` command in this process: ``(exit status, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A run trained for 2 short epochs, ``gndgl eval --json`` of it and its test images."""
    tmp = tmp_path_factory.mktemp("export")
    art = compile_spec(SPEC, out_dir=tmp / "compiled")
    train_artifact(art, TrainOptions(limit_train=128, limit_test=N_TEST, run_dir=str(tmp / "run"), tensorboard=False))
    code, so, se = gndgl("eval", tmp / "run", "--json")
    assert code == 0, so + se
    data = load_dataset("synthetic", input_shape=(3, 32, 32), limit_train=1, limit_test=N_TEST,
                        synthetic={"shape": (3, 32, 32), "num_classes": 10})
    return {"tmp": tmp, "run": tmp / "run", "eval": json.loads(so), "data": data}


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return int((logits.argmax(1) == y).sum()) / len(y)


def images01(data) -> torch.Tensor:
    return data.test_x.float() / 255.0


def test_eval_is_informative(trained):
    """The comparisons below mean something only if the net is better than chance and not perfect everywhere."""
    ev = trained["eval"]
    assert ev["n"] == N_TEST and ev["source"] == "final weights"
    assert ev["test_acc"] > 0.2, ev


def test_load_run_equals_gndgl_eval(trained):
    net = load_run(trained["run"])
    data, ev = trained["data"], trained["eval"]
    assert net.source == "final weights" and net.normalization_source == "data.json"
    assert net.input_shape == (3, 32, 32) and net.classes == [f"class{i}" for i in range(10)]
    assert not net.training
    with torch.no_grad():
        assert accuracy(net(images01(data)), data.test_y) == ev["test_acc"]
        assert torch.equal(net(data.test_x).argmax(1), net(images01(data)).argmax(1))  # uint8 0..255 too
        assert net.partitions == list(ev["partition_acc"])
        for name in net.partitions:
            assert accuracy(net.partition(name)(images01(data)), data.test_y) == ev["partition_acc"][name], name


def test_partition_logits_equal_the_executors(trained):
    """Each partition's early exit gives the logits of its aux head in the executor's forward pass."""
    run, data = trained["run"], trained["data"]
    art = load_artifact(run / "artifact")
    load_state_tensors(art.modules, art.plan, load_file(str(run / "weights.safetensors")), "weights")
    optimizer = read_run_record(run)["config"]["optimizer"]
    ex = Executor(art.plan, art.modules, optimizer, {p.id: torch.device("cpu") for p in art.plan.partitions},
                  per_device_optim=False)
    for m in art.modules.values():
        m.eval()
    _, x, y = next(iter(Batches(data, batch_size=N_TEST, seed=0, epoch=0, train=False, augment=False)))
    net = load_run(run)
    with torch.no_grad():
        outs, _ = ex.forward(x, y, with_loss=False)
        for p in art.plan.partitions:
            part = net.partition(p.name)
            torch.testing.assert_close(part(images01(data)), outs[p.id]["logits"], atol=1e-4, rtol=1e-4)
        assert isinstance(part.body, torch.nn.Module) and isinstance(part.head, torch.nn.Module)
        torch.testing.assert_close(net.partition("head")(images01(data)), net(images01(data)))


def _load_exported(fmt: str, path: Path, run: Path, x01: torch.Tensor) -> torch.Tensor:
    """Logits of an exported file, loaded as its README entry says."""
    if fmt == "torchscript":
        return torch.jit.load(str(path))(x01)
    if fmt == "export":
        return torch.export.load(str(path)).module()(x01)
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"images": x01.numpy()})[0])
    net = load_artifact(run / "artifact").assembled()
    net.load_state_dict(load_file(str(path)), strict=True)
    net.eval()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    mean = torch.tensor(json.loads(meta["mean"])).view(1, -1, 1, 1)
    std = torch.tensor(json.loads(meta["std"])).view(1, -1, 1, 1)
    assert meta["format"] == "gndgl-assembled" and json.loads(meta["classes"])[0] == "class0"
    return net((x01 - mean) / std)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt,suffix", [("torchscript", ".pt"), ("export", ".pt2"), ("onnx", ".onnx"),
                                        ("safetensors", ".safetensors")])
def test_exported_model_accuracy_equals_gndgl_eval(trained, fmt, suffix):
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
    out = trained["tmp"] / "exports" / f"model{suffix}"
    code, so, se = gndgl("export", trained["run"], "-o", out, *(["--format", fmt] if fmt != "export" else []))
    assert code == 0, so + se
    assert "wrote" in so and out.is_file()
    data = trained["data"]
    with torch.no_grad():
        logits = _load_exported(fmt, out, trained["run"], images01(data))  # 64 images; exported with a batch of 2
    assert accuracy(logits, data.test_y) == trained["eval"]["test_acc"]


def test_export_one_partition(trained):
    out = trained["tmp"] / "exports" / "m2.pt2"
    code, so, se = gndgl("export", trained["run"], "-o", out, "--partition", "m2.g1")
    assert code == 0, so + se
    data = trained["data"]
    with torch.no_grad():
        logits = torch.export.load(str(out)).module()(images01(data))
    assert accuracy(logits, data.test_y) == trained["eval"]["partition_acc"]["m2.g1"]


def test_loading_reads_only_json_and_safetensors(trained, tmp_path):
    """load_run never unpickles or executes anything from the run directory (decoy pickles are ignored)."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    for decoy in (run / "weights.pt", run / "checkpoints" / "ckpt-000000099.pt", run / "model.pkl"):
        decoy.write_bytes(pickle.dumps(torch.zeros(1)))
    load_run(run)  # imports done, so only the load itself is watched
    seen: list[tuple[str, str]] = []
    WATCH.append((str(run.resolve()), seen))
    try:
        net = load_run(run)
    finally:
        WATCH.clear()
    assert net.source == "final weights"
    assert not [e for e in seen if e[0] in ("pickle.find_class", "marshal.loads")], seen
    assert not [e for e in seen if e[0] in ("exec", "compile")], seen
    opened = [Path(p) for kind, p in seen if kind == "open"]
    assert opened, "the audit hook saw no file"
    for p in opened:
        rel = p.resolve().relative_to(run.resolve())
        assert p.suffix in (".json", ".safetensors") or rel.parts[0] == "artifact", p  # artifact/: sha256 only


WATCH: list[tuple[str, list]] = []
"""(run directory, event list) while a load is watched by :func:`_audit`."""


def _audit(event: str, args: tuple) -> None:
    if not WATCH:
        return
    root, seen = WATCH[0]
    if event in ("pickle.find_class", "marshal.loads"):
        seen.append((event, repr(args)[:80]))
    elif event == "open" and isinstance(args[0], (str, os.PathLike)) and os.path.abspath(args[0]).startswith(root):
        seen.append((event, os.fspath(args[0])))
    elif event in ("exec", "compile"):
        name = getattr(args[0], "co_filename", None) if event == "exec" else args[1]
        if isinstance(name, (str, os.PathLike)) and os.path.abspath(name).startswith(root):
            seen.append((event, os.fspath(name)))


sys.addaudithook(_audit)


def test_older_run_without_data_json(trained, tmp_path):
    """Runs from before data.json: the data set's statistics (recomputed, or the table for known sets)."""
    ref = json.loads((trained["run"] / "data.json").read_text())
    run = tmp_path / "old"
    shutil.copytree(trained["run"], run)
    (run / "data.json").unlink()
    net = load_run(run)
    assert net.mean == pytest.approx(ref["mean"]) and net.std == pytest.approx(ref["std"])
    assert "synthetic" in net.normalization_source
    record = json.loads((run / "run.json").read_text())
    record["config"].update(dataset="cifar10", data_root=str(tmp_path / "no-data"))
    (run / "run.json").write_text(json.dumps(record))
    net = load_run(run)  # CIFAR-10 files absent: its standard statistics
    assert tuple(net.mean) == STATS["cifar10"][0] and tuple(net.std) == STATS["cifar10"][1]


def test_unfinished_run_loads_its_newest_checkpoint(trained, tmp_path):
    """Without weights.safetensors (a run still training or stopped) the newest checkpoint is used, as by eval."""
    run = tmp_path / "partial"
    shutil.copytree(trained["run"], run)
    (run / "weights.safetensors").unlink()
    net, data = load_run(run), trained["data"]
    assert net.source.startswith("checkpoint ckpt-")
    with torch.no_grad():
        assert accuracy(net(images01(data)), data.test_y) == trained["eval"]["test_acc"]  # the last checkpoint = final


def test_wrong_images_are_refused(trained):
    net = load_run(trained["run"])
    for bad in (torch.rand(3, 32, 32), torch.rand(2, 1, 28, 28), torch.zeros(2, 3, 32, 32, dtype=torch.int64)):
        with pytest.raises(InputError, match="N×3×32×32|uint8"):
            net(bad)
    with pytest.raises(RunError, match="valid partition names: m1.g0, m1.g1, m2.g0, m2.g1, head"):
        net.partition("m3.g0")


@pytest.fixture(scope="module")
def bad_runs(trained):
    """Run directories that cannot be exported, and a plain folder."""
    tmp = trained["tmp"] / "bad"
    tmp.mkdir()
    (tmp / "plain").mkdir()
    (tmp / "notes.txt").write_text("a file, not a folder\n")
    shutil.copytree(trained["run"], tmp / "untrained")
    (tmp / "untrained" / "weights.safetensors").unlink()
    shutil.rmtree(tmp / "untrained" / "checkpoints")
    shutil.copytree(trained["run"], tmp / "damaged")
    (tmp / "damaged" / "data.json").write_text('{"mean": [0.5], "std": [0.2], "classes": []}')
    shutil.copytree(trained["run"], tmp / "lost-data")
    (tmp / "lost-data" / "data.json").unlink()
    record = json.loads((tmp / "lost-data" / "run.json").read_text())
    record["config"]["dataset"] = str(tmp / "no-such-folder")
    (tmp / "lost-data" / "run.json").write_text(json.dumps(record))
    return tmp


# id -> (argv after 'gndgl export', substrings of the message)
EXPORT_ERRORS = {
    "not-a-run": (["{bad}/plain", "-o", "{bad}/m.pt2"], ["not a gndgl run directory"]),
    "no-weights": (["{bad}/untrained", "-o", "{bad}/m.pt2"], ["no weights or checkpoints yet", "gndgl train"]),
    "unknown-partition": (["{run}", "-o", "{bad}/m.pt2", "--partition", "m9.g9"],
                          ["'m9.g9' is not a partition", "valid partition names: m1.g0, m1.g1, m2.g0, m2.g1, head"]),
    "unknown-format": (["{run}", "-o", "{bad}/m.pt2", "--format", "tflite"],
                       ["unknown export format 'tflite'", "torchscript", "safetensors"]),
    "no-suffix": (["{run}", "-o", "{bad}/model"], ["cannot tell the format", "--format"]),
    "output-is-a-folder": (["{run}", "-o", "{bad}/plain", "--format", "export"], ["is a directory", "file name"]),
    "output-in-artifact": (["{run}", "-o", "{run}/artifact/m.pt"], ["artifact/ folder", "elsewhere"]),
    "output-over-run-weights": (["{run}", "-o", "{run}/weights.safetensors"], ["file of the run itself", "elsewhere"]),
    "output-under-a-file": (["{run}", "-o", "{bad}/notes.txt/m.pt"], ["cannot create the folder", "another -o"]),
    "safetensors-partition": (["{run}", "-o", "{bad}/m.safetensors", "--partition", "m1.g0"],
                              ["--partition exports a program"]),
    "damaged-data-json": (["{bad}/damaged", "-o", "{bad}/m.pt2"], ["data.json", "damaged", "delete it"]),
    "lost-data-set": (["{bad}/lost-data", "-o", "{bad}/m.pt2"], ["no data.json", "cannot be loaded here", "write"]),
}


@pytest.mark.parametrize("case", sorted(EXPORT_ERRORS))
def test_bad_export_exits_2_with_a_message(trained, bad_runs, case):
    argv, needles = EXPORT_ERRORS[case]
    argv = [a.replace("{bad}", str(bad_runs)).replace("{run}", str(trained["run"])) for a in argv]
    code, so, se = gndgl("export", *argv)
    assert code == 2, so + se
    assert "Traceback" not in so + se and "error:" in se, se
    flat = " ".join(se.split())
    for needle in needles:
        assert needle in flat, f"{needle!r} not in {flat!r}"
    assert not list(bad_runs.glob("m.*")) and not list(bad_runs.glob(".m.*"))


def test_onnx_without_the_package_says_what_to_install(trained, tmp_path):
    """A real process in which 'import onnx' fails (a stub package first on the path)."""
    (tmp_path / "stub" / "onnx").mkdir(parents=True)
    (tmp_path / "stub" / "onnx" / "__init__.py").write_text("raise ImportError('onnx is hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "stub"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-m", "gndgl_cli.main", "export", str(trained["run"]), "-o",
                          str(tmp_path / "m.onnx")], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert 'pip install "gndgl[export]"' in " ".join(res.stderr.split())
    assert not (tmp_path / "m.onnx").exists()
