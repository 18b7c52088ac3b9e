"""Session-scoped fixtures the distributed test files share (a pytest plugin: ``tests/conftest.py``
lists it in ``pytest_plugins``), so a run two files read is trained once.

    art            specs compiled once
    single         single-process reference weights (one thread, fused as the ranks fuse)
    dist_run       finished ``launch_local`` runs (resnet32_k2g2 on 3 ranks: stopped and resumed)
    reference_run  an uninterrupted ``gndgl train --workers 2`` run of resnet32_k2g1 (8 steps)

Helpers: ``tests/dist_helpers.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_helpers import TRAIN2, captured, gndgl, launch_run, resume_run, train_single
from paths import SPECS


@pytest.fixture(scope="session")
def art(tmp_path_factory):
    """``art(name)``: ``specs/<name>.yaml`` compiled once per session (or ``art(name, spec)``: a spec
    dict or YAML text, cached under ``name``)."""
    from gndgl_compiler import compile_spec

    base = tmp_path_factory.mktemp("artifacts")
    cache: dict[str, Path] = {}

    def get(name: str, spec=None) -> Path:
        if name not in cache:
            cache[name] = compile_spec(spec if spec is not None else SPECS / f"{name}.yaml", base / name).path
        return cache[name]

    return get


@pytest.fixture(scope="session")
def single(art, tmp_path_factory):
    """``single(name, batch, fused, split)``: single-process weights (one thread), cached (``train_single``)."""
    base = tmp_path_factory.mktemp("single")
    cache: dict[tuple, dict] = {}

    def get(name: str, batch: int, fused: bool | None = None, split: frozenset[int] | None = None
            ) -> dict[str, torch.Tensor]:
        key = (name, batch, fused, split)
        if key not in cache:
            tag = "pp" if split is None else "-".join(map(str, sorted(split))) or "all"
            cache[key] = train_single(art(name), base / f"{name}-{batch}-{fused}-{tag}", batch, fused, split)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def dist_run(art, tmp_path_factory):
    """``dist_run(name, workers, fused)``: a finished ``launch_local`` run (threads 1, batches of 32), cached.
    resnet32_k2g2 on 3 ranks (m1 sibling-fused on rank 0) is stopped after 2 of its 4 steps (committing
    every step) and resumed, so the comparison with one process also checks that fused ranks resume
    exactly; ``get.printed[key]`` is what the ranks of the first launch printed."""
    base = tmp_path_factory.mktemp("dist")
    cache: dict[tuple, Path] = {}

    def get(name: str, workers: int, fused: bool | None) -> Path:
        key = (name, workers, fused)
        if key not in cache:
            run = base / f"{name}-{workers}-{fused}"
            extra = ["--no-fused"] if fused is False else []
            stop = key == ("resnet32_k2g2", 3, None)
            if stop:
                extra += ["--max-steps", "2", "--checkpoint-every", "1"]
            r = captured(lambda: launch_run(art(name), run, workers, 32, *extra))
            assert r.returncode == 0, r.out[-4000:]
            get.printed[key] = r.out
            if stop:
                assert json.loads((run / "summary.json").read_text())["steps"] == 2
                r = captured(lambda: resume_run(run, workers))
                assert r.returncode == 0, r.out[-4000:]
            cache[key] = run
        return cache[key]

    get.printed = {}
    return get


@pytest.fixture(scope="session")
def reference_run(art, tmp_path_factory):
    """An uninterrupted ``gndgl train --workers 2`` run of resnet32_k2g1 (8 steps)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    r = gndgl("train", str(art("resnet32_k2g1")), "--run-dir", str(run), *TRAIN2)
    assert r.returncode == 0, r.out[-4000:]
    return run
