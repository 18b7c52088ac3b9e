"""``benchmarks/gpu_check.py --smoke`` runs on the CPU and writes its three phases (issue 13).

The GPU check itself needs a GPU; this proves the script works, so the next GPU session can run it
with one command: ``python benchmarks/gpu_check.py --smoke --out DIR`` in a subprocess (one thread,
2 specs, 2 steps, batch 8), then the JSON has the correctness, speed and accuracy phases with their
statuses (accuracy ``skipped``: no ``--cifar``), CUDA-only checks reported as skipped, and a table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
from paths import REPO



def test_gpu_check_smoke_writes_three_phases(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GNDGL_CACHE": str(tmp_path / "cache")}
    argv = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)]
    if torch.cuda.is_available():
        argv += ["--device", "cpu"]  # the same checks everywhere; the GPU run is the script's real use
    t = time.perf_counter()
    res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    took = time.perf_counter() - t
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert took < 60, f"smoke run took {took:.0f} s"
    # three files only: a lent GPU machine returns at most 8 files from its output folder
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_check_logs.txt"]
    assert "SIGKILLed after checkpoint" in (out / "gpu_check_logs.txt").read_text()
    results = json.loads((out / "gpu_check.json").read_text())
    phases = results["phases"]
    assert list(phases) == ["correctness", "speed", "accuracy"]
    assert phases["correctness"]["status"] == "pass"
    assert phases["speed"]["status"] == "pass"
    assert phases["accuracy"]["status"] == "skipped" and "--cifar" in phases["accuracy"]["reason"]
    checks = phases["correctness"]["checks"]
    assert all(c["status"] in ("pass", "skipped") for c in checks), checks
    by_name = {}
    for c in checks:
        by_name.setdefault(c["name"], []).append(c)
    assert len(by_name["train"]) == 2 and all(c["status"] == "pass" for c in by_name["train"])
    assert by_name["kill_resume"][0]["status"] == "pass" and by_name["kill_resume"][0]["weights_rel"] == 0.0
    assert any(c["status"] == "pass" for c in by_name["fused_vs_partition_f32"])
    assert all(c["message"] == "skipped (no CUDA)" for c in by_name["no_host_sync"])
    assert all(c["status"] == "skipped" for n in ("cuda_graphs_on_vs_off", "cuda_graphs_on_vs_off_dropout")
               for c in by_name[n])
    rows = phases["speed"]["rows"]
    assert {r["spec"] for r in rows} == {"resnet32_e2e", "resnet32_k8g4"} and all(r["gndgl_img_s"] > 0 for r in rows)
    assert phases["speed"]["cuda_graphs"].startswith("n/a")
    assert results["meta"]["torch"] == torch.__version__
    md = (out / "gpu_check.md").read_text()
    assert "## 1. Correctness — pass" in md and "| GN-DGL K=8 G=4 | 8 |" in md and "## 3. Accuracy" in md
