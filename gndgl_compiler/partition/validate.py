"""Invariant checks of a partition plan (run on every compile).

1. The partition graph is acyclic (every edge goes from a lower to a higher id,
   or from the image).
2. Partitions communicate only through declared inputs/shares, which codegen
   detaches: no IR node refers to a name outside its own partition.
3. Every partition has a loss and a head output to apply it to.
4. Every weight of the network belongs to exactly one partition: the groups of
   each parametric op (conv, linear, attention, ...) cover its output channels exactly once.
5. MAN (DESIGN §2.3): each weight edge joins U's partition (k+1, g′) to (k, g), carries no per-sample
   tensor and no gradient, and each EMA node of the aux net is a copy of U's op that owns no network weight.
"""

from __future__ import annotations

from collections import defaultdict

import networkx as nx

from ..errors import PartitionError
from ..graph.build import OpGraph
from ..graph.ops import find_op
from .man import check_links
from .plan import IMAGE, PartitionPlan


def _parametric(kind: str) -> bool:
    """True for registry ops with channel-mapping weights ('input' nodes are not ops)."""
    op = find_op(kind)
    return op is not None and op.parametric


_NEEDS = {"ce": "logits", "predsim": "sim", "infopro": "recon"}


def validate_plan(plan: PartitionPlan, og: OpGraph) -> None:
    """Raise :class:`PartitionError` if any invariant of the module docstring fails."""
    g = nx.DiGraph()
    g.add_nodes_from(p.id for p in plan.partitions)
    module_of = {p.id: p.module for p in plan.partitions}
    for e in plan.edges:
        if e.kind == "weight":
            continue  # MAN's weight edge: forward-only parameters, no gradient (check_links below)
        if e.kind in ("share", "diversity"):
            if module_of[e.src] != module_of[e.dst] or e.src == e.dst:
                raise PartitionError(f"internal: {e.kind} edge {e.src}->{e.dst} does not join two siblings")
        elif e.src != IMAGE:
            if e.src >= e.dst:
                raise PartitionError(f"internal: edge {e.src}->{e.dst} ({e.kind}) goes backwards")
            g.add_edge(e.src, e.dst)
    if not nx.is_directed_acyclic_graph(g):
        raise PartitionError("internal: the partition graph has a cycle")
    check_links(plan.partitions)
    weights = sorted((e.src, e.dst) for e in plan.edges if e.kind == "weight" and not e.bytes_per_sample)
    if weights != sorted((p.man.source, p.id) for p in plan.partitions if p.man is not None):
        raise PartitionError("internal: the weight edges do not match the MAN links (one per MAN partition, "
                             "from U's partition, no per-sample bytes)")
    owned: dict[str, int] = defaultdict(int)
    for p in plan.partitions:
        for part_nodes in (p.body, p.head):
            names: set[str] = set()
            for n in part_nodes:
                missing = [a for a in n.args if a not in names]
                if missing:
                    raise PartitionError(f"internal: {p.name}.{n.name} reads {missing} from outside its partition")
                names.add(n.name)
        if not p.loss.kind or _NEEDS.get(p.loss.kind) not in p.head_outputs:
            raise PartitionError(f"internal: partition {p.name} has no usable loss ({p.loss.kind})")
        for n in p.body:
            if n.source and _parametric(n.kind):
                owned[n.source] += n.attrs["out"]
        if p.kind in ("final", "e2e") or p.head_kind.startswith("final:model"):
            for n in p.head:
                if n.source and _parametric(n.kind):
                    owned[n.source] += n.attrs["out"]
    final_kind = plan.final.head_kind
    for name, d in og.graph.nodes(data=True):
        if not _parametric(d["kind"]):
            continue
        in_classifier = d["segment"] == len(og.segments) - 1
        if in_classifier and final_kind != "final:model":
            continue
        if owned.get(name, 0) != d["attrs"]["out"]:
            raise PartitionError(f"internal: the outputs of '{name}' are owned {owned.get(name, 0)} times "
                                 f"over {d['attrs']['out']} channels; each weight must belong to one partition")
