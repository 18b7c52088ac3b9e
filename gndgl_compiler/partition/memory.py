"""The memory model (DESIGN §4.1): activation bytes per partition and the peak of a training step.

Per partition, per sample, **activation bytes**: every tensor autograd saves in the forward of the body, the
aux head and the local loss, each storage counted once, at float32. The registry says what each op saves
(:attr:`OpDef.saves`) and which ops return a view of their input (:attr:`OpDef.view`); a saved input resolves
to the storage that holds it (a detached partition input is the upstream partition's output, a channel slice
is its source's storage). The loss keeps a few tensors the size of each head output (:data:`LOSS_COPIES`,
:data:`DIVERSITY_COPIES`); the recon and proj counts are not checked by the tests. Per-channel statistics
(BN's mean and inverse std) and parameters are not activations.

The step's peak follows the runtime's schedule (``runtime/step/executor.py``, ``step_plan.py``): stage by stage
(one module's partitions on a device), forward then backward. While stage *i* runs, its saved storages are alive
with the body outputs kept for later stages (released after their last reader) and a transient of two of the
largest tensors (a gradient and the next); its backward walks the ops in reverse, freeing each storage at its
first saver and adding that op's parameter gradients (:func:`backward_profile`). A sibling-fused module
(the executor's default for a module of several partitions on one device) concatenates its inputs once and its
heads read its output once, holds every tensor of its bodies' forward until the forward returns, and keeps its
gradients in preallocated buffers (resting memory); the other
modules' gradients live to the end of the step, when the foreach optimizer step makes a temporary copy:

    above rest(B) = max over the step's ops of (B · activations alive + gradients alive)
    peak(B)       = above rest(B) + parameters + optimizer state + the fused modules' gradients

End-to-end training keeps every activation of the network at once. Compared with the heap high-water mark of
a step (``benchmarks/memory.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..graph.build import OpGraph
from ..graph.ops import find_op, get_op
from .plan import IMAGE, IRNode, Partition, PartitionPlan

FLOAT = 4
INDEX = 8
OPTIM_STATE = {"sgd": 1, "adam": 2, "adamw": 2}
"""Optimizer-state tensors per parameter (SGD: the momentum buffer, none without momentum; Adam: two moments)."""

LOSS_COPIES = {"logits": 1, "sim": 2, "recon": 2, "proj": 1}
"""Tensors the size of a head output that its local loss saves: cross-entropy's log-softmax; predsim's centred
and normalised flat features (on a map it keeps the map); InfoPro's target image and reconstruction; SupCon's
projection."""
DIVERSITY_COPIES = 4
"""With diversity, the loss saves this many more tensors the size of the logits, one per sibling's detached
distribution, and a boolean mask."""

Storages = dict[tuple, int]
"""A storage's key -> its bytes per sample. Keys: ``("out", pid)`` a body output (``("out", IMAGE)`` the image),
``(pid, part, node)`` another node's output, ``(pid, "x", node)`` what an op saves beyond its tensors."""


def _nbytes(shape: list[int]) -> int:
    return math.prod(shape) * FLOAT


@dataclass
class _Trace:
    """What a partition's forward saves: ``saved`` storages, the position (in forward order: body, head, loss)
    of each one's first saver — its backward frees it — and the gradient bytes of each position's parameters."""

    saved: Storages = field(default_factory=dict)
    first: dict[tuple, int] = field(default_factory=dict)
    grads: dict[int, int] = field(default_factory=dict)
    length: int = 0
    fused: bool = False

    def save(self, key: tuple, nbytes: int) -> None:
        self.saved[key] = nbytes
        self.first.setdefault(key, self.length)


def _walk(p: Partition, nodes: list[IRNode], part: str, keys: dict[str, tuple], sizes: dict[tuple, int],
          tr: _Trace) -> None:
    """Add what ``nodes`` save to ``tr``; ``keys`` maps each node to the storage holding its output."""
    shapes = {m.name: m.shape for m in nodes}
    for n in nodes:
        if n.kind == "input":
            continue
        op = get_op(n.kind)
        if op.view:
            keys[n.name] = keys[n.args[0]]
        elif tr.fused and op.variadic and _shared_cat(p, part, [keys.get(a, ()) for a in n.args]):
            # a sibling-fused module concatenates its inputs once, and its heads read its whole output once
            # (runtime/fusion/stage.py, shared_head.py)
            keys[n.name] = (part, "cat", p.module)
            sizes[keys[n.name]] = _nbytes(n.shape)
        else:
            keys[n.name] = ("out", p.id) if part == "b" and n.name == p.output else (p.id, part, n.name)
            sizes[keys[n.name]] = _nbytes(n.shape)
        s = op.saves(n.attrs, [tuple(shapes[a]) for a in n.args], tuple(n.shape))
        for i in s.inputs:
            tr.save(keys[n.args[i]], sizes[keys[n.args[i]]])
        if s.output:
            tr.save(keys[n.name], sizes[keys[n.name]])
        if s.extra or s.index:
            tr.save((p.id, "x", part + n.name), s.extra * FLOAT + s.index * INDEX)
        tr.grads[tr.length] = n.params * FLOAT
        tr.length += 1


def _shared_cat(p: Partition, part: str, args: list[tuple]) -> bool:
    """A concatenation (the variadic op) every sibling makes alike: of the module's inputs (body) or of the
    siblings' outputs (head)."""
    if part == "b":
        return all(a[:1] == ("out",) and a[1] != p.id for a in args)
    return ("out", p.id) in args


def _trace(p: Partition, input_shapes: dict[int, list[int]], aux: bool = True, fused: bool = False) -> _Trace:
    keys: dict[str, tuple] = {}
    sizes: dict[tuple, int] = {}
    tr = _Trace(fused=fused)
    inputs = [n for n in p.body if n.kind == "input"]
    for n, inp in zip(inputs, p.inputs):
        keys[n.name] = ("out", inp.source)
        sizes[keys[n.name]] = _nbytes(input_shapes[inp.source])
    _walk(p, p.body, "b", keys, sizes, tr)
    if not aux:
        return tr
    heads = [n for n in p.head if n.kind == "input"]
    for n, src in zip(heads, [p.id] + [s.source for s in p.shares]):
        keys[n.name] = ("out", src)
        sizes.setdefault(keys[n.name], _nbytes(input_shapes[src]))
    _walk(p, p.head, "h", keys, sizes, tr)
    shapes = {n.name: n.shape for n in p.head}
    for key, name in p.head_outputs.items():
        if key == "sim" and len(shapes[name]) > 1:  # predsim on a map: the map itself (reduced to a std per channel)
            tr.save(keys[name], sizes[keys[name]])
            continue
        copies = LOSS_COPIES.get(key, 1)
        if key == "logits" and p.loss.diversity_weight > 0:
            copies += DIVERSITY_COPIES + len(p.siblings)
            tr.save((p.id, "loss", "mask"), math.prod(shapes[name]))  # a bool per class
        tr.save((p.id, "loss", key), copies * _nbytes(shapes[name]))
    tr.length += 1
    return tr


def saved_storages(p: Partition, input_shapes: dict[int, list[int]], aux: bool = True, fused: bool = False
                   ) -> Storages:
    """The storages the forward of partition ``p`` (body, aux head, loss) leaves for backward, per sample.

    Args:
        p: the partition.
        input_shapes: ``{source id: per-sample shape}`` of every partition output and of the image (``IMAGE``).
        aux: include the head and the loss (else the body only).
        fused: as part of a sibling-fused module (the concatenations every sibling makes alike are one storage).
    """
    return _trace(p, input_shapes, aux, fused).saved


def backward_profile(parts: list[Partition], shapes: dict[int, list[int]], kept: Storages, grads_before: int = 0,
                     fused: bool = False) -> list[tuple[int, int]]:
    """``(activation bytes per sample, gradient bytes)`` alive at each op of one backward through ``parts``
    (their forwards done, in this order): the backward walks the ops in reverse, adding each op's parameter
    gradients and freeing the storages it was the first to save (not those in ``kept``); the activations include
    a transient of two of the largest tensors. ``fused``: the partitions run as one sibling-fused program, whose
    body tensors hold all G groups at once (the transient is G bodies' largest, or a head's), whose forward
    holds all its body tensors until it returns (the first point), and whose gradients live in preallocated
    buffers (resting memory, not counted here)."""
    live: Storages = dict(kept)
    first: dict[tuple, int] = {}
    grad_at: dict[int, int] = {}
    off = 0
    for tr in (_trace(p, shapes, fused=fused) for p in parts):
        live.update(tr.saved)
        for k, q in tr.first.items():
            first[k] = min(first.get(k, q + off), q + off)
        for q, g in tr.grads.items():
            grad_at[q + off] = grad_at.get(q + off, 0) + (0 if fused else g)
        off += tr.length
    free_at: dict[int, int] = {}
    for k, q in first.items():
        if k not in kept:
            free_at[q] = free_at.get(q, 0) + live[k]
    body, head = [_largest(p.body, fused) for p in parts], [_largest(p.head) for p in parts]
    largest = max(sum(body), *head) if fused else max(*body, *head)
    act, grads = sum(live.values()) + 2 * largest, grads_before
    points = [(_fused_forward(parts, kept), grads)] if fused else []
    for q in range(off - 1, -1, -1):
        grads += grad_at.get(q, 0)
        points.append((act, grads))
        act -= free_at.get(q, 0)
    return points


def _fused_forward(parts: list[Partition], kept: Storages) -> int:
    """A sibling-fused body's forward holds every tensor it makes until it returns: all of them, per sample."""
    made = sum(_nbytes(n.shape) for p in parts for n in p.body
               if n.kind != "input" and not get_op(n.kind).view and not get_op(n.kind).variadic)
    cats = max((_nbytes(n.shape) for p in parts for n in p.body if n.kind != "input" and get_op(n.kind).variadic),
               default=0)
    return sum(kept.values()) + made + cats


def _largest(nodes: list[IRNode], per_group: bool = False) -> int:
    """The largest tensor ``nodes`` make (``per_group``: leaving out the concatenation of a module's inputs,
    which a sibling-fused module makes once)."""
    ops = [n for n in nodes if n.kind != "input"]
    return max((_nbytes(n.shape) for n in ops if not (per_group and get_op(n.kind).variadic)), default=0)


def _stages(parts: list[Partition]) -> list[list[Partition]]:
    stages: list[list[Partition]] = []
    for p in parts:
        if not stages or stages[-1][0].module != p.module:
            stages.append([])
        stages[-1].append(p)
    return stages


def _kept(stages: list[list[Partition]], shapes: dict[int, list[int]]) -> list[Storages]:
    """Per stage: the body outputs (and the image) held in the step's table while it runs."""
    first = {IMAGE: 0}
    last: dict[int, int] = {}
    for i, stage in enumerate(stages):
        for p in stage:
            first[p.id] = i
            last[p.id] = max(last.get(p.id, i), i)
            for src in [inp.source for inp in p.inputs] + [sh.source for sh in p.shares]:
                last[src] = max(last.get(src, i), i)
    return [{("out", s): _nbytes(shapes[s]) for s in last if first.get(s, 0) <= i <= last[s]}
            for i in range(len(stages))]


def device_memory(parts: list[Partition], shapes: dict[int, list[int]], optimizer: str, momentum: float,
                  fuse: bool = True) -> dict[str, Any]:
    """The memory of a step on one device whose partitions are ``parts`` (network order).

    Args:
        fuse: the executor's sibling fusion (its default): a module whose partitions are all in ``parts`` runs
            as one fused program, whose gradients are preallocated (resting); the others' gradients appear in
            their backward and live to the end of the step, when the foreach optimizer step adds a temporary
            copy of them (weight decay, Nesterov, Adam's update).

    Returns:
        ``profile`` (:func:`backward_profile` of every stage, gradients accumulated over the stages, and the
        optimizer step), ``stage_bytes`` (per stage, per sample: the most activations alive), ``param_bytes``,
        ``grad_bytes``, ``optim_bytes``, ``rest_grad_bytes`` (the fused modules' gradients).
    """
    stages = _stages(parts)
    profile: list[tuple[int, int]] = []
    stage_bytes, rest_grads = [], 0
    for stage, kept in zip(stages, _kept(stages, shapes)):
        fused = fuse and _whole_module(stage)
        rest_grads += sum(p.costs["param_bytes"] for p in stage) if fused else 0
        points = backward_profile(stage, shapes, kept, profile[-1][1] if profile else 0, fused)
        stage_bytes.append(max(a for a, _ in points))
        profile += points
    profile.append((0, 2 * profile[-1][1]))  # the optimizer step's copy of the step's gradients
    pb = sum(p.costs["param_bytes"] for p in parts)
    tb = sum(p.costs.get("grad_bytes", p.costs["param_bytes"]) for p in parts)
    n_state = OPTIM_STATE[optimizer] if optimizer != "sgd" or momentum > 0 else 0
    return {"profile": profile, "stage_bytes": stage_bytes, "param_bytes": pb, "grad_bytes": tb,
            "optim_bytes": n_state * tb, "rest_grad_bytes": rest_grads}


def _whole_module(stage: list[Partition]) -> bool:
    """A module of several partitions, all in ``stage``: the executor runs it sibling-fused."""
    return len(stage) > 1 and {p.id for p in stage} == {stage[0].id, *stage[0].siblings}


def step_peak(mem: dict[str, Any], batch: int, static: bool = True) -> int:
    """Predicted peak bytes of a training step at ``batch`` (from :func:`device_memory`); without ``static``,
    the part above the resting memory (parameters and optimizer state excluded)."""
    peak = max(batch * act + grads for act, grads in mem["profile"])
    return peak + (mem["param_bytes"] + mem["optim_bytes"] + mem["rest_grad_bytes"] if static else 0)


def op_graph_bytes(og: OpGraph, nodes: list[str]) -> int:
    """Per sample: the storages the op-graph nodes ``nodes`` save for backward, each once (what ``cuts.balance:
    memory`` balances; a view resolves to the storage it views)."""
    g = og.graph

    def base(v: str) -> str:
        while (op := find_op(g.nodes[v]["kind"])) is not None and op.view:
            v = min(g.in_edges(v, data="pos"), key=lambda e: e[2])[0]
        return v

    saved: Storages = {}
    for v in nodes:
        d = g.nodes[v]
        args = [u for u, _, _ in sorted(g.in_edges(v, data="pos"), key=lambda e: e[2])]
        s = get_op(d["kind"]).saves(d["attrs"], [tuple(x) for x in d["in_shapes"]], tuple(d["shape"]))
        for b in [base(args[i]) for i in s.inputs] + ([base(v)] if s.output else []):
            saved[(b,)] = _nbytes(g.nodes[b]["shape"])
        if s.extra or s.index:
            saved[("x", v)] = s.extra * FLOAT + s.index * INDEX
    return sum(saved.values())


def e2e_activation_bytes(plan: PartitionPlan, shapes: dict[int, list[int]]) -> int:
    """Per sample: what end-to-end training keeps at once (every body, the final head and its loss)."""
    union: Storages = {}
    final = plan.final
    for p in plan.partitions:
        union.update(saved_storages(p, shapes, aux=p.id == final.id))
    return sum(union.values())


def _frozen_params(p: Partition) -> int:
    """Parameters of ``p`` that train by no gradient (MAN's EMA unit in its aux net)."""
    return sum(n.params for n in p.head if p.man is not None and n.name in p.man.ema)


def annotate_memory(plan: PartitionPlan, optimizer: str, momentum: float, batch: int) -> None:
    """Add the memory model to ``partition.costs`` and ``plan.summary["memory"]`` (after placement)."""
    shapes = {IMAGE: list(plan.input_shape), **{p.id: p.out_shape for p in plan.partitions}}
    n_state = OPTIM_STATE[optimizer] if optimizer != "sgd" or momentum > 0 else 0
    for p in plan.partitions:
        pb = p.costs["params"] * FLOAT
        tb = pb - _frozen_params(p) * FLOAT  # MAN's EMA unit: parameters without gradient or optimizer state
        p.costs.update({"act_bytes": sum(saved_storages(p, shapes).values()), "param_bytes": pb, "grad_bytes": tb,
                        "optim_bytes": n_state * tb})
    devices: dict[str, Any] = {}
    for dev in dict.fromkeys(p.device for p in plan.partitions):
        mem = device_memory([p for p in plan.partitions if p.device == dev], shapes, optimizer, momentum)
        devices[dev] = {**{k: v for k, v in mem.items() if k != "profile"}, "peak_act_bytes": max(mem["stage_bytes"]),
                        "peak_bytes": step_peak(mem, batch), "peak_above_rest_bytes": step_peak(mem, batch, False)}
    plan.summary["memory"] = {"batch_size": batch, "e2e_act_bytes": e2e_activation_bytes(plan, shapes),
                              "max_act_bytes": max(p.costs["act_bytes"] for p in plan.partitions),
                              "devices": devices}
