"""The op registry is the one place that knows op kinds.

``test_new_op_kind_*`` follow the recipe "An op kind" of docs/architecture.md: a new
:class:`OpDef`, registered for one ``with`` block by :func:`extra_ops` (nothing leaks
into other tests), builds into the op graph, partitions by groups, emits code that runs
and draws, without any change to stage code. ``test_every_kind_a_stage_mentions_*``
checks that the kinds the stages build or compare are declared in the registry, and
that the stages themselves do not switch on op-kind names.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import BaseModel

from gndgl_compiler.codegen.modules import build_assembled, build_partitions
from gndgl_compiler.errors import GraphError, PartitionError
from gndgl_compiler.graph.build import UNIT_BUILDERS, build_units
from gndgl_compiler.graph.ops import OPS, RANDOM_KINDS, OpDef, extra_ops, get_op, registry
from gndgl_compiler.partition.partitioner import build_plan
from gndgl_compiler.partition.validate import validate_plan
from gndgl_compiler.runtime.step.executor import Executor
from gndgl_compiler.runtime.fusion import FUSED_OPS, FusedOpDef, extra_fused_ops, fused_registry
from gndgl_compiler.runtime.fusion.pointwise import function
from gndgl_compiler.spec.load import load_spec
from gndgl_compiler.spec.models import LAYER_OPS
from gndgl_compiler.spec.templates import expand_model
from gndgl_compiler.viz.dot import plan_to_dot
from paths import REPO



def _scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The new op's function: ``factor · x`` (acts per channel)."""
    return x * factor


# step 1 of the recipe: one OpDef (a channelwise function op, so split='follow' by default)
SCALE = OpDef("scale", shape=lambda a, i: i[0], function=_scale, kwargs=lambda a, i: {"factor": a["factor"]},
              label=lambda a: f" ×{a['factor']:g}")
WHOLE = OpDef("whole_op", shape=lambda a, i: i[0], function=_scale, kwargs=lambda a, i: {"factor": 1.0},
              split="whole")
NOISY = OpDef("noisy", shape=lambda a, i: i[0], module=lambda a, i, o: torch.nn.Dropout(0.1), random=True)


class ScaleUnit(BaseModel):
    """Step 2 of the recipe: the spec model of its unit (here outside the Spec union, to stay scoped)."""

    op: Literal["scale", "whole_op"] = "scale"
    name: str
    factor: float = 2.0


SPEC = {
    "name": "registry_test",
    "model": {"input_shape": [3, 16, 16], "num_classes": 10, "layers": [
        {"op": "conv", "name": "conv1", "out": 8}, {"op": "bn"}, {"op": "relu"},
        {"op": "block", "name": "block1", "out": 8}, {"op": "block", "name": "block2", "out": 16, "stride": 2},
        {"op": "adaptive_avgpool", "size": 1}, {"op": "flatten"}, {"op": "linear", "name": "fc", "out": 10}]},
    "cuts": {"depth": ["block1"], "width": 2},
    "local": {"head": {"kind": "1c2f", "hidden": 16}, "final_head": {"kind": "1c2f", "hidden": 16}},
}


def _compile(factor: float = 2.0, op: str = "scale", width: int = 2):
    """The spec's units with the new unit after block1 (ending module 1) and block2; op graph, plan, modules."""
    spec = load_spec({**SPEC, "cuts": {"depth": ["block1"], "width": width}})
    layers = expand_model(spec.model)
    names = [u.name for u in layers]
    layers.insert(names.index("block2") + 1, ScaleUnit(op=op, name="scale2", factor=factor))
    layers.insert(names.index("block1") + 1, ScaleUnit(op=op, name="scale1", factor=factor))
    og = build_units(layers, spec.model.input_shape, spec.model.num_classes)
    plan = build_plan(spec, og)
    validate_plan(plan, og)
    return og, plan, build_partitions(plan, seed=0)


def test_new_op_kind_builds_partitions_emits_runs_and_draws():
    assert "scale" not in registry()
    with extra_ops(SCALE):
        og, plan, parts = _compile(2.0)
        # graph: one node of the new kind, in the segment of the layer before it
        assert og.node("scale1")["kind"] == "scale" and og.node("scale1")["shape"] == (8, 16, 16)
        assert [s.units for s in og.segments if s.name == "block1"] == [["block1", "scale1"]]
        # groups: each group scales its own slice (4 of 8 channels in module 1, 8 of 16 in module 2)
        for module, name, shape in ((1, "scale1", [4, 16, 16]), (2, "scale2", [8, 8, 8])):
            groups = [p for p in plan.partitions if p.module == module]
            assert len(groups) == 2
            for p in groups:
                (node,) = [n for n in p.body if n.kind == "scale"]
                assert (node.name, node.shape, node.attrs) == (name, shape, {"factor": 2.0})
        # codegen: the generated body calls the op, and the whole network runs
        m2 = [p for p in plan.partitions if p.module == 2]
        assert "_scale" in parts[m2[0].id].body.code
        x = torch.randn(2, 3, 16, 16)
        # the op does what its entry says: module 1 ends in scale1, so factor 2 doubles its output exactly
        _, _, parts1 = _compile(1.0)
        m1 = next(p for p in plan.partitions if p.module == 1)
        assert torch.equal(parts[m1.id].body.eval()(x), 2 * parts1[m1.id].body.eval()(x))
        net = build_assembled(plan, parts).train()
        logits = net(x)
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        # drawing: a small ellipse labelled by the entry's label
        dot = plan_to_dot(plan, level="ops")
        line = next(ln for ln in dot.splitlines() if '"m2.g0/scale2"' in ln and "label=" in ln)
        assert 'label="scale ×2"' in line and 'shape="ellipse"' in line
    assert "scale" not in registry() and "scale" not in OPS
    with pytest.raises(GraphError, match="unknown op 'scale'"):
        get_op("scale")


def test_new_op_kind_that_cannot_be_split_is_refused_in_a_grouped_module():
    with extra_ops(WHOLE):
        with pytest.raises(PartitionError, match="cannot be split into groups"):
            _compile(op="whole_op", width=2)
        _, plan, _ = _compile(op="whole_op", width=1)
        assert any(n.kind == "whole_op" for p in plan.partitions for n in p.body)


def test_extra_ops_is_scoped_and_refuses_a_known_kind():
    with pytest.raises(ValueError, match="already registered"):
        with extra_ops(OpDef("conv", shape=lambda a, i: i[0], function=_scale)):
            pass
    assert registry()["conv"] is OPS["conv"]
    with pytest.raises(ValueError, match="exactly one of module and function"):
        OpDef("bad", shape=lambda a, i: i[0])
    with pytest.raises(ValueError, match="split must be one of"):
        OpDef("bad", shape=lambda a, i: i[0], function=_scale, split="channels")


def test_random_ops_come_from_the_registry():
    """What the executor reads as its random op kinds (``random_ops=RANDOM_KINDS``) is a view of the registry."""
    assert "dropout" in RANDOM_KINDS and "relu" not in RANDOM_KINDS
    assert "noisy" not in RANDOM_KINDS
    with extra_ops(NOISY):
        assert "noisy" in RANDOM_KINDS
        assert set(RANDOM_KINDS) == {"dropout", "noisy"}
    assert "noisy" not in RANDOM_KINDS


# --- every kind a stage mentions is declared ---------------------------------------------------------------

def _sources(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (REPO / d).rglob("*.py"))


def _literals(node: ast.AST) -> list[str]:
    elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]


def _is_op_kind(expr: ast.AST, names: tuple[str, ...] = ()) -> bool:
    """``n.kind`` / ``m.kind`` / ``node.kind`` / ``op.kind`` (IR nodes, registry entries), ``d["kind"]`` (op-graph
    node data), or a bare name in ``names``."""
    if isinstance(expr, ast.Attribute):
        return expr.attr == "kind" and isinstance(expr.value, ast.Name) and expr.value.id in ("n", "m", "node", "op")
    if isinstance(expr, ast.Subscript):
        return (isinstance(expr.value, ast.Name) and expr.value.id == "d" and isinstance(expr.slice, ast.Constant)
                and expr.slice.value == "kind")
    return isinstance(expr, ast.Name) and expr.id in names


def _mentions(path: Path, names: tuple[str, ...] = ()) -> list[tuple[int, str, str]]:
    """``(line, how, kind)`` of every op kind a file builds (``b.add(name, "kind", ...)``) or compares."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add" \
                and len(node.args) >= 3 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str):
            out.append((node.lineno, "builds", node.args[1].value))
        elif isinstance(node, ast.Compare) and _is_op_kind(node.left, names):
            out += [(node.lineno, "compares", k) for c in node.comparators for k in _literals(c)]
        elif isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            if len([k for k in keys if k in OPS]) >= 2:  # a table keyed by op kinds
                out += [(node.lineno, "keys", k) for k in keys]
    return out


def test_every_kind_a_stage_mentions_is_declared():
    known = set(OPS) | {"input"}  # 'input' marks IR placeholders, not an op
    missing = [f"{p.relative_to(REPO)}:{line} {how} '{k}'"
               for p in _sources("gndgl_compiler", "cli")
               for line, how, k in _mentions(p, ("kind",) if p.parent.name == "fusion" else ())
               if how != "keys" and k not in known]
    assert not missing, missing
    built = [k for p in _sources("gndgl_compiler") for _, how, k in _mentions(p) if how == "builds"]
    assert {"conv", "cat", "slice", "add", "layernorm"} <= set(built)  # the scan sees the builders
    # every spec unit is an op of the registry or a several-op unit with a builder
    assert [u for u in LAYER_OPS if u not in OPS and u not in UNIT_BUILDERS] == []
    # the executor's fused path names kinds too (its fused-op table); they must exist
    tables = set(FUSED_OPS)
    assert tables and tables <= set(OPS)


def test_stages_do_not_switch_on_op_kind_names():
    """Stage code asks the registry: it compares no op kind (only the IR 'input' placeholder, not an op) and
    keeps no table keyed by op kinds outside ``graph/`` (the registry and the spec-unit expansions)."""
    stages = _sources("gndgl_compiler/graph", "gndgl_compiler/partition", "gndgl_compiler/codegen",
                      "gndgl_compiler/viz")
    switches = [f"{p.relative_to(REPO)}:{line} {how} '{k}'" for p in stages
                for line, how, k in _mentions(p, ("kind",)) if k in OPS
                and (how == "compares" or (how == "keys" and p.parent.name != "graph"))]
    assert not switches, switches


# --- sibling fusion: one table entry per fused op kind ------------------------------------------------------

UNFUSED: set[str] = set()
"""Op kinds without an exact sibling-fused form (their modules run per partition): none, every kind fuses."""


def test_fused_op_table_covers_exactly_the_kinds_fusion_runs():
    """The fused-op table names registry kinds, each under its own name, and every op kind but the ones
    in :data:`UNFUSED`; a kind without an entry is not fused, whatever the rest of fusion knows."""
    assert all(k == d.kind for k, d in FUSED_OPS.items())
    assert fused_registry() == FUSED_OPS and set(FUSED_OPS) <= set(OPS)
    assert set(OPS) - set(FUSED_OPS) == UNFUSED
    with extra_ops(SCALE):
        _, plan, parts = _compile(2.0)
        ex = Executor(plan, parts, None, {pid: torch.device("cpu") for pid in parts}, siblings=True)
        refused = [r["reason"] for r in ex.fusion if not r["fused"] and len(r["partitions"]) > 1]
        assert refused and all(r.startswith("op 'scale'") for r in refused), ex.fusion


def test_new_fused_op_kind_is_one_entry():
    """A new op kind (registered for one block) fuses with one :class:`FusedOpDef`: the scaled network's
    fused step equals the per-partition one in float64 (losses and gradients)."""
    plain = {"kind": "sgd", "lr": 1.0, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "betas": (0.9, 0.999)}
    with extra_ops(SCALE), extra_fused_ops(FusedOpDef("scale", function())):
        _, plan, parts = _compile(2.0)
        runs = []
        for siblings in (True, False):
            mods = {pid: copy.deepcopy(m).double() for pid, m in parts.items()}
            ex = Executor(plan, mods, plain, {pid: torch.device("cpu") for pid in mods}, per_device_optim=True,
                          siblings=siblings)
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
            runs.append((ex, ex.train_step(x, y, 1.0, seed=(0, 0))))
        (fused, sf), (_, sr) = runs
        assert [r["fused"] for r in fused.fusion if len(r["partitions"]) > 1] == [True, True]
        assert all(torch.allclose(sf[p][0], sr[p][0], rtol=1e-12, atol=0) for p in sr)
        for pid, m in runs[1][0].modules.items():
            got = fused.modules[pid].state_dict()
            assert all(torch.allclose(got[k], v, rtol=1e-10, atol=1e-12) for k, v in m.state_dict().items()), pid
    assert "scale" not in fused_registry()
    with pytest.raises(ValueError, match="already registered"):
        with extra_fused_ops(FusedOpDef("conv", function())):
            pass


def test_fusion_does_not_switch_on_op_kind_names():
    """Fusion code asks its table: it compares no op kind, keeps no table keyed by op kinds outside
    ``fusion/table.py``, and dispatches on no name built from a kind (``getattr(self, f"_{kind}")``)."""
    fusion = _sources("gndgl_compiler/runtime/fusion")
    assert fusion
    switches = [f"{p.relative_to(REPO)}:{line} {how} '{k}'" for p in fusion
                for line, how, k in _mentions(p, ("kind",)) if k in OPS
                and (how == "compares" or (how == "keys" and p.name != "table.py"))]
    dynamic = [f"{p.relative_to(REPO)}:{node.lineno} getattr by a built name" for p in fusion
               for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
               and len(node.args) > 1 and not isinstance(node.args[1], ast.Constant)]
    assert not switches and not dynamic, switches + dynamic
