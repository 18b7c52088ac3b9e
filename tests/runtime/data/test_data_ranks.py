"""Fed only where read (``runtime/data/ranks.py``): in a distributed run, ranks without a partition
that reads the image draw labels alone, never open an image, and train the same weights."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_spec import tiny_spec

from gndgl_compiler import compile_spec
from gndgl_compiler.runtime.data.feed import StreamFeed
from gndgl_compiler.runtime.data.ranks import LabelFeed, fed_where_read, image_readers, ranks_note
from gndgl_compiler.runtime.data.select import FeedRequest, load_feed
from gndgl_compiler.spec.models import Augment, DataFeed
from paths import SPECS



def make_folder(root: Path, n_train: int = 8, n_eval: int = 3) -> Path:
    rng = np.random.default_rng(4)
    for split, n in (("train", n_train), ("test", n_eval)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GNDGL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    spec = tmp_path_factory.mktemp("ranks") / "s.yaml"
    spec.write_text(tiny_spec("tiny_ranks", "train:\n  dataset: synthetic\n", num_classes=3, deep=False))
    return compile_spec(str(spec)).plan


def test_the_image_is_read_by_module_1_and_infopro_losses(plan):
    assert image_readers(plan) == {p.id for p in plan.partitions if p.module == 1} and len(image_readers(plan)) == 2
    infopro = compile_spec(str(SPECS / "resnet32_infopro_k8.yaml")).plan
    assert image_readers(infopro) == {p.id for p in infopro.partitions if p.loss.kind == "infopro" or p.module == 1}
    assert len(image_readers(infopro)) > 1


def test_a_labels_only_rank_draws_the_same_labels_without_opening_an_image(plan, tmp_path):
    folder = make_folder(tmp_path / "f")
    aug = Augment()
    f = load_feed(FeedRequest(str(folder), aug, (3, 32, 32), torch.device("cpu"), DataFeed(mode="stream", workers=1)))
    assert isinstance(f, StreamFeed)
    module2 = [p.id for p in plan.partitions if p.module == 2]
    module1 = [p.id for p in plan.partitions if p.module == 1]
    assert fed_where_read(f, plan, module1, world=2) is f and fed_where_read(f, plan, module2, world=1) is f
    labels = fed_where_read(f, plan, module2, world=2)
    assert isinstance(labels, LabelFeed) and labels.summary()["data_mode"] == "labels"
    kw = dict(batch_size=5, seed=3, epoch=2, start_step=1, train=True, augment=True, pad=4, flip=True)
    full = [(s, y) for s, _, y in f.batches(**kw)]
    for q in folder.rglob("*.jpg"):  # from here on, any image read fails
        q.write_bytes(b"gone")
    got = list(labels.batches(**kw))
    assert [(s, y.tolist()) for s, _, y in got] == [(s, y.tolist()) for s, y in full] and len(got) == 3
    assert got[0][1].shape == (5, 3, 32, 32) and got[0][1].stride() == (0, 0, 0, 0)  # a placeholder, no memory
    placed = dataclasses.replace(plan, partitions=[dataclasses.replace(p, worker=int(p.module == 2))
                                                   for p in plan.partitions])
    assert ranks_note(placed, 2, f) == "data: rank 0 read images; rank 1 read labels only"
    assert ranks_note(placed, 1, f) == "" and ranks_note(placed, 3, f).endswith("ranks 1, 2 read labels only")
    skip = load_feed(FeedRequest(str(make_folder(tmp_path / "g")), aug, (3, 32, 32), torch.device("cpu"),
                                 DataFeed(mode="stream", workers=1, on_bad_image="skip")))
    assert fed_where_read(skip, plan, module2, world=2) is skip and "all 2 ranks read images" in ranks_note(plan, 2,
                                                                                                           skip)


def test_a_distributed_streamed_run_equals_one_process_and_says_who_reads(tmp_path):
    folder = make_folder(tmp_path / "f")
    spec = tmp_path / "s.yaml"
    spec.write_text(tiny_spec("tiny_ranks", f"train:\n  dataset: {folder}\n  batch_size: 6\n  epochs: 1\n",
                              num_classes=3, deep=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "NO_COLOR": "1", "GNDGL_CACHE": str(tmp_path / "c")}
    common = ["--set", "train.data.mode=stream", "--set", "train.data.workers=1", "--no-fuse-siblings",
              "--no-tensorboard"]
    procs = {name: subprocess.Popen([sys.executable, "-m", "gndgl_cli.main", "train", str(spec), *common, *extra,
                                     "--run-dir", name], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for name, extra in (("dist", ["--workers", "2"]), ("one", []))}  # started together: overlapped start-ups
    runs = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), runs
    assert "data: rank 0 read images; rank 1 read labels only" in runs["dist"]
    a, b = (load_file(str(tmp_path / n / "weights.safetensors")) for n in ("dist", "one"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
