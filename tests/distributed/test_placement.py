"""Placement: contiguous vs group-wise choice, balance, and the predicted cross-worker traffic."""

from __future__ import annotations

import math

import pytest
import torch

from gndgl_compiler import compile_spec
from gndgl_compiler.partition.placement import (_busiest, balanced_assignment, cross_worker_bytes,
                                                groupwise_assignment, place)
from gndgl_compiler.runtime.dist.peer import PeerComm
from paths import SPECS



@pytest.fixture(scope="module")
def plans():
    return {name: compile_spec(SPECS / f"{name}.yaml").plan
            for name in ("resnet32_k2g1", "resnet32_k2g2", "resnet32_k8g4", "vgg6a_g6_sg_div")}


def test_dgl_stays_contiguous(plans):
    plan = plans["resnet32_k2g1"]
    assert groupwise_assignment(plan, 2) is None
    place(plan, plan.devices, 2)
    assert [p.worker for p in plan.partitions] == sorted(p.worker for p in plan.partitions)


def test_groupwise_wins_when_it_balances_better(plans):
    plan = plans["resnet32_k2g2"]
    costs = [p.costs["train_macs"] for p in plan.partitions]
    contiguous, groupwise = balanced_assignment(costs, 2), groupwise_assignment(plan, 2)
    assert _busiest(plan, groupwise) < _busiest(plan, contiguous)
    place(plan, plan.devices, 2)
    owner = {p.name: p.worker for p in plan.partitions}
    assert owner["m1.g0"] == owner["m2.g0"] != owner["m1.g1"] == owner["m2.g1"]


@pytest.mark.parametrize("name", ["resnet32_k2g1", "resnet32_k2g2", "resnet32_k8g4", "vgg6a_g6_sg_div"])
@pytest.mark.parametrize("workers", [2, 3, 4])
def test_every_worker_used_and_never_worse_than_contiguous(plans, name, workers):
    plan = plans[name]
    costs = [p.costs["train_macs"] for p in plan.partitions]
    place(plan, plan.devices, workers)
    used = {p.worker for p in plan.partitions}
    assert used == set(range(min(workers, len(plan.partitions))))
    assert _busiest(plan, [p.worker for p in plan.partitions]) <= _busiest(plan, balanced_assignment(costs, workers))


@pytest.mark.parametrize("name", ["resnet32_k2g2", "resnet32_k8g4", "vgg6a_g6_sg_div"])
@pytest.mark.parametrize("workers", [2, 3, 4])
def test_cross_worker_bytes_match_the_runtime_routing(plans, name, workers):
    """The cost model's bytes per sample equal what PeerComm's routing tables send (built independently
    from the partitions' inputs, shares and siblings)."""
    plan = plans[name]
    place(plan, plan.devices, workers)
    parts = {p.id: p for p in plan.partitions}
    sent = 0
    for rank in range(workers):
        comm = PeerComm(plan, rank, batch_size=1, device=torch.device("cpu"))
        for src, dsts in comm.act_dst.items():
            if parts[src].worker == rank:
                sent += len(dsts) * math.prod(parts[src].out_shape) * 4
        for src, by_rank in comm.share_dst.items():
            if parts[src].worker == rank:
                for r, ch in by_rank.items():
                    if r not in comm.act_dst.get(src, set()):
                        sent += ch * math.prod(parts[src].out_shape[1:]) * 4
        for src, dsts in comm.div_dst.items():
            if parts[src].worker == rank:
                sent += len(dsts) * plan.num_classes * 4
    assert cross_worker_bytes(plan) == sent
