"""The ImageNet nets through the CLI and the literature's configurations (DESIGN §2.2).

* ``gndgl units`` lists a torchvision template's segments (``stem``, ``s1.b0`` .. ``s4.b2``, ``fc``);
* ``gndgl train`` trains the shipped GN-DGL ResNet-50 K=4 G=2 spec for 2 steps on synthetic 64×64 data
  (bottleneck modules run per partition, and the run says why);
* every spec under ``specs/imagenet/`` starts with what it reproduces, compiles, and cuts where the
  literature's table says;
* ResNet-152 cut after every unit (K = 51) with G = 4: 205 partitions, planned and compiled.
"""

from __future__ import annotations

import json
import time

import pytest

from cli_helpers import gndgl
from gndgl_compiler import compile_spec
from gndgl_compiler.api import plan_spec
from paths import SPECS

IMAGENET_SPECS = SPECS / "imagenet"

# DESIGN §2.2: cut after these units (the last module runs to s4's end).
TABLE = {
    "resnet101_infopro_k2": ["s2.b0"],
    "resnet152_infopro_k2": ["s2.b5"],
    "resnext101_32x8d_infopro_k2": ["s2.b2"],
    "resnet101_manpp_k4": ["s2.b2", "s3.b8", "s3.b16"],
    "resnet152_manpp_k4": ["s2.b6", "s3.b13", "s3.b25"],
    "resnext101_32x8d_manpp_k4": ["s2.b2", "s3.b8", "s3.b16"],
    "resnet101_hpff_k4": ["s3.b0", "s3.b9", "s3.b17"],
    "resnet101_hpff_k8": ["s2.b0", "s3.b1", "s3.b5", "s3.b9", "s3.b13", "s3.b17", "s3.b21"],
}


def test_units_lists_the_torchvision_segment_names(tmp_path):
    (tmp_path / "r50.yaml").write_text("name: r50\nmodel: {template: resnet50}\n")
    out = gndgl(tmp_path, "units", "r50.yaml", columns=200)
    assert out.returncode == 0, out.stderr
    names = [line.split()[1] for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert names == ["stem"] + [f"s{s}.b{j}" for s, n in enumerate((3, 4, 6, 3), 1) for j in range(n)] + ["fc"]
    assert "stem stem_bn stem_relu stem_pool" in out.stdout


def test_train_resnet50_k4g2_on_synthetic_64px(tmp_path):
    spec = IMAGENET_SPECS / "resnet50_k4g2.yaml"
    out = gndgl(tmp_path, "train", str(spec), "--dataset", "synthetic", "--max-steps", "2", "--run-dir", "run",
                "--no-tensorboard", "--log-every", "1", "--set", "model.input_shape=[3, 64, 64]",
                "--set", "model.num_classes=10", "--set", "train.batch_size=8",
                "--set", "train.augment.random_resized_crop.size=64", columns=200)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["dataset"] == "synthetic"
    text = " ".join((out.stdout + out.stderr).split())
    assert "sibling-fused modules: 1, 2, 3, 4" in text  # bottleneck modules run fused
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("kind") == "train"]
    assert len(losses) == 2 * 9 and all(x == x and x < 1e3 for x in losses)  # 4×2 partitions + the head


@pytest.mark.parametrize("path", sorted(IMAGENET_SPECS.glob("*.yaml")), ids=lambda p: p.stem)
def test_literature_specs_compile_and_cut_as_published(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Reproduces: ") and len(first) > 40
    plan = plan_spec(path)
    ends = [p.units[-1] for p in plan.partitions if p.kind != "final" and p.group == 0][:-1]
    if path.stem in TABLE:
        assert ends == TABLE[path.stem]
    else:  # GN-DGL on ResNet-50: K = 4, G = 2 or 4, plus the final head
        G = int(path.stem[-1])
        assert len(plan.partitions) == 4 * G + 1 and len(ends) == 3
    assert plan.summary["params"] < 250_000_000


def test_resnet152_cut_after_every_unit_with_four_groups(tmp_path):
    text = ("name: r152\nmodel: {template: resnet152}\ncuts: {depth: 51, width: 4}\n"
            "local: {head: {kind: linear}, final_head: {kind: model}}\n")
    t0 = time.perf_counter()
    plan = plan_spec(text)
    planned = time.perf_counter() - t0
    assert len(plan.partitions) == 51 * 4 + 1 == 205
    assert [p.units for p in plan.partitions if p.group == 0][1] == ["s1.b0"]
    t0 = time.perf_counter()
    art = compile_spec(text, tmp_path / "out")
    compiled = time.perf_counter() - t0
    assert len(art.modules) == 205
    print(f"ResNet-152 K=51 G=4: planned in {planned:.2f} s, compiled (artifact written) in {compiled:.2f} s")
    assert compiled < 60  # the < 5 s target is measured on a quiet machine (README), not asserted under load
