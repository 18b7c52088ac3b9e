"""Messages a new user meets, through the CLI: spec fields that need several values, names,
data set paths that are not data sets, and what the default final head replaced.

Bad input exits 2 with one ``error:`` paragraph and no traceback. (Spec messages are also
in the ``tests/cli/bad_specs/`` corpus; Ctrl-C's "stopped at step N" is in ``test_faults_kill.py``.)
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from cli_helpers import bad, gndgl
from tiny_spec import tiny_spec

TINY = tiny_spec("tiny_msg", "train:\n  dataset: synthetic\n  batch_size: 16\n  epochs: 1\n  augment: null\n",
                 deep=False)
# a CNN of one's own: layers ending in its own linear classifier, final_head left at its default
OWN_CNN = """name: own_cnn
model:
  input_shape: [3, 32, 32]
  num_classes: 10
  layers:
    - {op: conv, out: 32}
    - {op: bn}
    - {op: relu}
    - {op: maxpool, kernel: 2}
    - {op: conv, out: 64}
    - {op: relu}
    - {op: maxpool, kernel: 2}
    - {op: conv, out: 64}
    - {op: relu}
    - {op: adaptive_avgpool, size: 1}
    - {op: flatten}
    - {op: linear, name: my_fc, out: 10}
cuts: {depth: 2}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("msg")
    (d / "tiny.yaml").write_text(TINY)
    (d / "own.yaml").write_text(OWN_CNN)
    assert gndgl(d, "compile", "tiny.yaml", "-o", "art").returncode == 0
    return d


def test_fixed_length_fields_and_names_say_what_is_allowed(work):
    err = bad(gndgl(work, "compile", "tiny.yaml", "-o", "x", "--set", "model.input_shape=[28, 28]"),
              "field 'model.input_shape'", "needs 3 values C, H, W; got 2")
    assert "required field is missing" not in err
    err = bad(gndgl(work, "compile", "tiny.yaml", "-o", "x", "--set", "name=my net!"),
              "field 'name'", "letters, digits, '_', '.' and '-'", '"my net!"')
    assert "^[A-Za-z0-9]" not in err


def _data_files(d: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(d / "one.png")
    (d / "garbage.tar.gz").write_bytes(b"not an archive\n" * 10)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = os.urandom(100_000)  # incompressible, so half the archive cuts a member short
        info = tarfile.TarInfo("train/a/x.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (d / "cut.tar.gz").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.mark.parametrize("path, fragments", [
    ("one.png", ["'one.png' is a single image, not a data set", "cifar10", "train/<class>/*"]),
    ("garbage.tar.gz", ["'garbage.tar.gz' is not a tar archive", "train/<class>/*"]),
    ("cut.tar.gz", ["cut.tar.gz: it is damaged or cut short", "train/<class>/*"]),
])
def test_dataset_that_is_not_a_data_set_gets_one_line(work, path, fragments):
    _data_files(work)
    err = bad(gndgl(work, "train", "art", "--dataset", path, "--max-steps", "1", "--no-tensorboard",
                    "--run-dir", "runs/never"), *fragments)
    assert len(err.splitlines()) == 1, err
    assert "ReadError" not in err and "method gz" not in err
    assert not (work / "runs" / "never").exists()


def test_default_final_head_says_what_it_replaced_and_warns_below_one(work):
    r = gndgl(work, "compile", "own.yaml", "-o", "own_default")
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "note: final head: the default 1c2f head" in out
    assert "replaces the model's own classifier (adaptive_avgpool9 flatten10 my_fc" in out
    assert "local.final_head.kind: model" in out
    err = " ".join(r.stderr.split())
    assert "warning: inference speed-up 0.8" in err and "is below 1" in err and "local.final_head.kind: model" in err

    r = gndgl(work, "compile", "own.yaml", "-o", "own_json", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    head = summary["final_head"]
    assert head["kind"] == "1c2f" and head["chosen_by"] == "default" and head["replaces"][-1] == "my_fc"
    assert head["keep_own"] == "local.final_head.kind: model" and head["params"] > 100 * head["replaced_params"]
    assert summary["summary"]["inference_speedup"] < 1
    assert len(summary["warnings"]) == 1 and "below 1" in summary["warnings"][0]


def test_own_classifier_kept_gives_no_note_or_warning(work):
    r = gndgl(work, "compile", "own.yaml", "-o", "own_kept", "--set", "local.final_head.kind=model")
    assert r.returncode == 0, r.stderr
    assert "note:" not in r.stdout and "warning:" not in r.stderr
    r = gndgl(work, "compile", "own.yaml", "-o", "own_kept_json", "--set", "local.final_head.kind=model", "--json")
    head = json.loads(r.stdout)["final_head"]
    assert head["kind"] == "model" and head["replaces"] == [] and head["keep_own"] is None
    assert json.loads(r.stdout)["warnings"] == []
