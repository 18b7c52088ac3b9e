"""The executor's seams: step plan, Transport, stage runners, Updater, fault-injecting transport.

* a custom in-memory Transport (the recipe of docs/architecture.md "A transport") carrying the
  activations between two Executors that each own half of the network gives, step by step, the
  losses and weights of one Executor with the default transport, bit for bit;
* the step plan is plain data: stages in network order, every body output released once after
  its last reader, the random (dropout) partitions, and a fusion record per module;
* the Updater's state_dict / load_state_dict is the checkpoint's ``"optim"`` entry (keys by device
  or by partition) and a restored updater continues bit for bit; per-partition param groups;
* the test-side fault transport (``tests/fault_worker.py``) forwards everything and faults on cue.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fault_worker import FaultyTransport, parse
from gndgl_compiler import compile_spec
from gndgl_compiler.partition.plan import IMAGE
from gndgl_compiler.runtime.dist.peer import PeerComm
from gndgl_compiler.runtime.step.executor import Executor
from gndgl_compiler.runtime.fusion import SiblingFusedRunner
from gndgl_compiler.runtime.step.runner import PartitionRunner
from gndgl_compiler.runtime.dist.transport import LocalTransport, Transport
from tiny_spec import tiny_spec
from paths import SPECS

CPU = torch.device("cpu")
SGD = {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, "betas": (0.9, 0.999)}

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(art, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *art.plan.input_shape, generator=g),
            torch.randint(0, art.plan.num_classes, (n,), generator=g))


@pytest.fixture(scope="module")
def k2g2():
    """The tiny K=2 G=2 network (sharing, diversity, separate final head: 5 partitions)."""
    return compile_spec(tiny_spec("seams", "train:\n  dataset: synthetic\n  batch_size: 8\n"))


class MailboxTransport:
    """An in-memory transport between Executors in one process: what a partition elsewhere reads is
    put in a shared mailbox on send and taken from it on receive (detached copies, as over a wire)."""

    in_process = False

    def __init__(self, plan, owned: set[int], mailbox: dict):
        self.parts = {p.id: p for p in plan.partitions}
        self.read_elsewhere = {src for q in plan.partitions if q.id not in owned
                               for src in [i.source for i in q.inputs] + [s.source for s in q.shares]}
        self.owned, self.box, self.step, self.bytes_sent = owned, mailbox, 0, 0

    def begin_step(self, step: int) -> None:
        self.step = step

    def drain(self) -> None:
        pass

    def _take(self, h: dict, src: int) -> None:
        if src != IMAGE and src not in h:
            h[src] = self.box[(self.step, "act", src)]

    def recv_inputs(self, pid: int, h: dict) -> None:
        for i in self.parts[pid].inputs:
            self._take(h, i.source)

    def send_output(self, pid: int, out: torch.Tensor) -> None:
        if pid in self.read_elsewhere:
            t = out.detach().clone()
            self.box[(self.step, "act", pid)] = t
            self.bytes_sent += t.numel() * t.element_size()

    def recv_shares(self, pid: int, h: dict) -> None:
        for s in self.parts[pid].shares:
            self._take(h, s.source)

    def exchange_diversity(self, p_hat: dict) -> None:
        for pid in list(p_hat):
            self.box[(self.step, "div", pid)] = p_hat[pid].detach().clone()
        for pid in list(p_hat):
            for sib in self.parts[pid].siblings:
                if sib not in p_hat and (self.step, "div", sib) in self.box:
                    p_hat[sib] = self.box[(self.step, "div", sib)]


def test_transports_implement_the_protocol(k2g2):
    assert isinstance(LocalTransport(), Transport)
    assert isinstance(PeerComm(k2g2.plan, 0, batch_size=1, device=CPU), Transport)
    assert isinstance(MailboxTransport(k2g2.plan, {0}, {}), Transport)
    ex = Executor(k2g2.plan, copy.deepcopy(k2g2.modules), SGD, {p.id: CPU for p in k2g2.plan.partitions})
    assert isinstance(ex.transport, LocalTransport)  # the default


@pytest.mark.parametrize("fused,siblings", [(True, True), (True, False), (False, True)],
                         ids=["sibling-fused", "per-device-updater", "per-partition-updater"])
def test_custom_transport_equals_default_bit_for_bit(k2g2, fused, siblings):
    plan = k2g2.plan
    devices = {p.id: CPU for p in plan.partitions}
    ref = Executor(plan, copy.deepcopy(k2g2.modules), SGD, devices, per_device_optim=fused, siblings=siblings)
    mods = copy.deepcopy(k2g2.modules)
    first = {p.id for p in plan.partitions if p.module == 1}
    box: dict = {}
    ranks = []
    for owned in (first, set(mods) - first):
        t = MailboxTransport(plan, owned, box)
        ranks.append((t, Executor(plan, {pid: mods[pid] for pid in owned}, SGD, devices, per_device_optim=fused,
                                  siblings=siblings, transport=t)))
    # each module's siblings sit whole on one "rank": they fuse there as in one process (module 1 sends
    # its partitions' slices, module 2 receives them), and the weights stay bitwise those of one process
    assert [[r["fused"] for r in ex.fusion] for _, ex in ranks] == [[fused and siblings], [fused and siblings, False]]
    assert [r["fused"] for r in ref.fusion] == [fused and siblings] * 2 + [False]
    if not (fused and siblings):
        assert "fusion off" in ranks[0][1].fusion[0]["reason"]
    for step in range(3):
        x, y = batch(k2g2, seed=step)
        lr = SGD["lr"] * (1 - step / 4)
        want = ref.train_step(x, y, lr, seed=(0, step))
        got = {}
        for t, ex in ranks:  # "rank" 0 first: it sends, then rank 1 receives
            t.begin_step(step)
            got.update(ex.train_step(x, y, lr, seed=(0, step)))
        assert got.keys() == want.keys()
        for pid in want:
            assert torch.equal(got[pid][0], want[pid][0]), (step, pid)
            assert (got[pid][1] is None) == (want[pid][1] is None)
    assert ranks[0][0].bytes_sent > 0 and ranks[1][0].bytes_sent == 0
    for pid, m in ref.modules.items():
        for k, v in m.state_dict().items():
            assert torch.equal(mods[pid].state_dict()[k], v), (pid, k)


def test_siblings_on_other_ranks_run_per_partition(k2g2):
    plan = k2g2.plan
    devices = {p.id: CPU for p in plan.partitions}
    m2 = [p.id for p in plan.partitions if p.module == 2]
    owned = {p.id for p in plan.partitions if p.module == 1} | {m2[0]}  # m2.g1 and the head elsewhere
    ex = Executor(plan, {pid: copy.deepcopy(k2g2.modules[pid]) for pid in owned}, SGD, devices,
                  transport=MailboxTransport(plan, owned, {}))
    assert [(r["fused"], r["reason"]) for r in ex.fusion] == [(True, ""), (False, "siblings on other ranks")]
    assert [type(r) for r in ex.runners] == [SiblingFusedRunner, PartitionRunner]
    assert ex.runners[0].transport is ex.transport  # the fused module still sends to the other rank
    assert ex.fusion_summary() == "sibling-fused modules: 1; per partition (siblings on other ranks): 2"
    local = Executor(plan, copy.deepcopy(k2g2.modules), SGD, devices)
    assert local.runners[0].transport is local.transport  # every runner holds the executor's transport ...
    assert isinstance(local.transport, LocalTransport) and not local.runners[0].remote  # ... and skips its hooks


class RecordingUpdater:
    """Wraps an updater and records which partitions' losses each ``backward`` call carried."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def backward(self, losses, lr):
        self.calls.append(sorted(losses))
        self.inner.backward(losses, lr)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_sibling_fused_runner_goes_through_the_updater(k2g2):
    """Every stage's losses, sibling-fused or not, reach the optimizers through ``updater.backward``
    (the fused runner does not call backward itself): one call per stage, with the stage's partitions."""
    devices = {p.id: CPU for p in k2g2.plan.partitions}
    ex = Executor(k2g2.plan, copy.deepcopy(k2g2.modules), SGD, devices)
    ref = Executor(k2g2.plan, copy.deepcopy(k2g2.modules), SGD, devices)
    assert any(isinstance(r, SiblingFusedRunner) for r in ex.runners)
    ex.updater = RecordingUpdater(ex.updater)
    x, y = batch(k2g2)
    got, want = ex.train_step(x, y, 0.1), ref.train_step(x, y, 0.1)
    assert ex.updater.calls == [sorted(stage) for stage in ex.stages]
    assert all(torch.equal(got[pid][0], want[pid][0]) for pid in want)
    for pid in ex.order:
        for a, b in zip(ex.modules[pid].parameters(), ref.modules[pid].parameters()):
            assert torch.equal(a, b)


def test_siblings_may_name_the_modules_that_fuse(k2g2):
    """``siblings={2}``: module 2 fuses, module 1 runs per partition (what a one-process run that
    reproduces a distributed run's numerics passes, tests/dist_helpers.py ``train_single``)."""
    devices = {p.id: CPU for p in k2g2.plan.partitions}
    ex = Executor(k2g2.plan, copy.deepcopy(k2g2.modules), SGD, devices, siblings=frozenset({2}))
    assert [(r["module"], r["fused"], r["reason"]) for r in ex.fusion][:2] == [
        (1, False, "sibling fusion off for this module"), (2, True, "")]
    assert [type(r) for r in ex.runners][:2] == [PartitionRunner, SiblingFusedRunner]
    none = Executor(k2g2.plan, copy.deepcopy(k2g2.modules), SGD, devices, siblings=frozenset())
    assert not any(r["fused"] for r in none.fusion)


def test_step_plan_is_plain_data(k2g2):
    ex = Executor(k2g2.plan, copy.deepcopy(k2g2.modules), SGD, {p.id: CPU for p in k2g2.plan.partitions})
    sp = ex.step_plan
    parts = {p.id: p for p in k2g2.plan.partitions}
    assert sp.order == [p.id for p in k2g2.plan.partitions]
    assert [[parts[pid].module for pid in s] for s in sp.stages] == [[1, 1], [2, 2], [3]]
    released = [src for i in sorted(sp.release) for src in sp.release[i]]
    assert sorted(released) == sorted(sp.order + [IMAGE])  # every output dropped exactly once
    for i, srcs in sp.release.items():
        for src in srcs:  # ... after the last stage that reads it
            readers = [j for j, s in enumerate(sp.stages) for pid in s
                       if src == pid or src in [q.source for q in parts[pid].inputs + parts[pid].shares]]
            assert i == max(readers)
    assert sp.random == set()
    assert json.loads(json.dumps(sp.fusion)) == sp.fusion
    assert [r["fused"] for r in sp.fusion] == [True, True, False]
    assert [type(r) for r in ex.runners] == [SiblingFusedRunner, SiblingFusedRunner, PartitionRunner]
    # sequential schedule: a module whose siblings do not all train falls back to the per-partition runner
    assert ex.runners[0].takes(None) and not ex.runners[0].takes({sp.stages[0][0]})
    vgg = compile_spec(SPECS / "vgg6a_g2.yaml")
    ex = Executor(vgg.plan, copy.deepcopy(vgg.modules), SGD, {p.id: CPU for p in vgg.plan.partitions})
    assert ex.step_plan.random and all(any(n.kind == "dropout" for n in parts_.body + parts_.head)
                                       for parts_ in vgg.plan.partitions if parts_.id in ex.step_plan.random)
    # dropout draws from per-partition generators: the global RNG is not touched, and the masks are a
    # function of (seed, step, partition) alone (the same step again gives the same losses)
    small = compile_spec(SPECS / "vgg6a_g2.yaml", overrides=["model.width=0.25", "model.dropout=0.5"])
    x, y = batch(small, seed=1)
    runs = []
    for seed in [(0, 7), (0, 7), (1, 7)]:
        ex = Executor(small.plan, copy.deepcopy(small.modules), SGD, {p.id: CPU for p in small.plan.partitions})
        before = torch.get_rng_state()
        runs.append(torch.stack([loss for loss, _ in ex.train_step(x, y, 0.0, seed=seed).values()]))
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert not ex.streams.legacy and {pid for pid, _ in ex.streams.generators} == ex.random


@pytest.mark.parametrize("fused", [True, False], ids=["per-device", "per-partition"])
def test_updater_state_is_the_checkpoint_entry_and_resumes_exactly(k2g2, fused):
    plan = k2g2.plan
    devices = {p.id: CPU for p in plan.partitions}
    a = Executor(plan, copy.deepcopy(k2g2.modules), SGD, devices, per_device_optim=fused)
    for step in range(2):
        a.train_step(*batch(k2g2, seed=step), 0.1)
    state = a.updater.state_dict()
    assert list(state) == (["cpu"] if fused else [str(p.id) for p in plan.partitions])
    assert state == {str(k): o.state_dict() for k, o in a.optimizers.items()}  # the checkpoint's "optim"
    groups = a.updater.partition_groups()
    assert sorted(groups) == sorted(devices) and all(g["lr"] == 0.1 for g in groups.values())
    b = Executor(plan, copy.deepcopy(a.modules), SGD, devices, per_device_optim=fused)
    b.updater.load_state_dict(copy.deepcopy(state))
    x, y = batch(k2g2, seed=5)
    sa, sb = a.train_step(x, y, 0.05), b.train_step(x, y, 0.05)
    assert all(torch.equal(sa[p][0], sb[p][0]) for p in sa)
    for pid, m in a.modules.items():
        assert all(torch.equal(v, b.modules[pid].state_dict()[k]) for k, v in m.state_dict().items())


def test_fault_transport_forwards_and_faults_on_cue(k2g2):
    assert parse("", 1) is None and parse("kill:0:3", 1) is None and parse("raise:1:3", 1) == ("raise", 3)
    inner = PeerComm(k2g2.plan, 1, batch_size=1, device=CPU)
    t = FaultyTransport(inner, "raise", 3)
    assert isinstance(t, Transport) and t.in_process is False and t.bytes_sent == 0
    t.begin_step(2)
    assert inner.step == 2
    with pytest.raises(RuntimeError, match="injected fault"):
        t.begin_step(3)
    assert inner.step == 2  # the fault comes before the step begins
