"""Partition graphs as DOT text.

Two levels:

* ``ops`` — every IR node of every partition's body (aux heads collapsed into one
  node each unless ``heads=True``; the final head is always expanded), one
  ``subgraph cluster_<partition>`` per partition;
* ``partitions`` — one node per partition (name, forward MACs, parameters,
  placement), one cluster per module with its groups stacked (``rank=same``).

Modules run left to right (``rankdir=LR``); at the ops level a net of three or more
modules wraps, one row per module (a ``module k`` label starts each row, the edges
into the next row do not constrain the layout), so a K=8 picture fits a page
instead of a 16:1 strip. When one partition reads several
upstream partitions (a module's first layer reads all groups of the previous
module) the edges meet in a small ``concat`` junction, and with four or more
siblings sharing / diversity go through one hub per module, so wide graphs stay
readable. See :data:`~gndgl_compiler.viz.style.EDGE_STYLES` for the edge styles.

This module lays out the nodes and clusters; how an op is drawn (a box naming its unit or
a small ellipse, and the text after its kind) comes from the op registry (``OpDef.draw``,
``OpDef.label``); the edges between partitions are :mod:`.dot_edges`.
"""

from __future__ import annotations

from ..graph.ops import find_op
from ..partition.plan import Partition, PartitionPlan
from .dot_edges import PartitionEdges
from .style import (FINAL_FILL, FONT, IMAGE_FILL, PALETTE, Dot, Html, aux_from, edge_attrs, esc, fmt_count, fmt_shape,
                    legend)

LEVELS = ("auto", "ops", "partitions")
MAX_AUTO_OPS = 1500
"""``level='auto'`` draws ops up to this many IR nodes, else partitions."""


def choose_level(plan: PartitionPlan, level: str = "auto") -> str:
    """Resolve ``level`` ('auto', 'ops' or 'partitions') for this plan.

    Raises:
        ValueError: an unknown level.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; use one of {', '.join(LEVELS)}")
    if level != "auto":
        return level
    n = sum(len(p.body) for p in plan.partitions)
    return "ops" if n <= MAX_AUTO_OPS and len(plan.partitions) <= 64 else "partitions"


def plan_to_dot(plan: PartitionPlan, *, level: str = "auto", heads: bool = False, bundle: bool | None = None,
                title: str | None = None) -> str:
    """DOT source of a partition plan.

    Args:
        plan: the compiled plan.
        level: 'ops', 'partitions' or 'auto' (see :func:`choose_level`).
        heads: at the ops level, draw every aux-head op instead of one aux node.
        bundle: route sibling sharing / diversity through one hub per module
            (``None``: when a module has 4 or more groups).
        title: graph label; default: name, K, G and the speed-ups.

    Returns:
        The DOT text.
    """
    return _Builder(plan, choose_level(plan, level), heads, bundle).build(title)


def default_title(plan: PartitionPlan) -> str:
    """``name · K=.. · G=.. · N partitions · speed-ups`` of a plan."""
    gs = sorted(set(plan.groups))
    g = str(gs[0]) if len(gs) == 1 else "[" + ",".join(str(x) for x in plan.groups) + "]"
    s = plan.summary or {}
    text = f"{plan.name} · K={plan.num_modules} · G={g} · {len(plan.partitions)} partitions"
    if "training_speedup" in s:
        text += f" · training speed-up {s['training_speedup']:.2f}× · inference speed-up {s['inference_speedup']:.2f}×"
    return text


class _Builder(PartitionEdges):
    def __init__(self, plan: PartitionPlan, level: str, heads: bool, bundle: bool | None):
        self.plan, self.ops, self.heads, self.bundle = plan, level == "ops", heads, bundle
        self.rows = self.ops and len(plan.by_module()) >= 3
        """Ops level, 3+ modules: one row per module."""
        self.by_id = {p.id: p for p in plan.partitions}
        self.final_id = plan.final.id
        self.big = len(plan.partitions) > 40
        keys: list[str] = []
        for p in plan.partitions:
            if self.place(p) not in keys:
                keys.append(self.place(p))
        self.fill = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}
        self.nbytes = {(e.src, e.dst, e.kind): e.bytes_per_sample for e in plan.edges}
        self.out: dict[int, str] = {}
        self.ins: dict[int, list[list[str]]] = {}
        self.share_in: dict[int, dict[int, list[str]]] = {}
        self.aux_in: dict[int, str] = {}
        self.after: dict[int, int] = {}
        """Ranks a partition's own cluster uses after its output (the next module starts later)."""
        self.recon_in: dict[int, str] = {}
        self.pred_src = ""
        self.sib: dict[int, tuple[list, list, bool]] = {}
        self.has: set[str] = {"final"}

    # ------------------------------------------------------------------ helpers
    def place(self, p: Partition) -> str:
        """Placement label of a partition (device, plus worker when distributed)."""
        return p.device + (f" · w{p.worker}" if self.plan.workers > 1 else "")

    @staticmethod
    def nid(p: Partition, name: str) -> str:
        """Node id of op ``name`` of partition ``p``."""
        return f"{p.name}/{name}"

    # ------------------------------------------------------------------ build
    def build(self, title: str | None) -> str:
        """The whole DOT text."""
        plan = self.plan
        d = self.d = Dot(plan.name,
                         graph={"rankdir": "LR", "newrank": "true", "fontname": FONT, "fontsize": "16",
                                "labelloc": "t", "label": title if title is not None else default_title(plan),
                                "nodesep": "0.08" if self.ops else "0.15", "ranksep": "0.25" if self.ops else "0.45",
                                "pad": "0.3", **({"mclimit": "0.1"} if self.ops else {})},
                         node={"fontname": FONT, "fontsize": "9", "shape": "box", "style": "rounded,filled",
                               "fillcolor": "white", "height": "0.3", "width": "0.3", "margin": "0.06,0.03"},
                         edge={"fontname": FONT, "fontsize": "8", "arrowsize": "0.6"})
        d.node("image", label=f"IMAGE\n{fmt_shape(plan.input_shape)}", shape="box3d", style="filled,bold",
               fillcolor=IMAGE_FILL, fontsize="12")
        for module, parts in plan.by_module().items():
            self.module_cluster(module, parts)
        if self.rows:
            self.row_headers()
        d.node("prediction", label=f"PREDICTION\n{plan.num_classes} classes", shape="doubleoctagon",
               style="filled,bold", fillcolor=FINAL_FILL, fontsize="12")
        d.edge(self.pred_src, "prediction", edge_attrs("forward", penwidth="1.6"))
        self.activation_edges()
        self.sibling_edges()
        self.weight_edges()
        legend(d, self.fill, self.has)
        return d.text()

    def module_cluster(self, module: int, parts: list[Partition]) -> None:
        """One module: its partitions stacked (g0 on top), aux nodes and sharing / diversity hubs.

        Modules are not clusters (graphviz would stagger them); a header node names them.
        """
        d = self.d
        only_final = len(parts) == 1 and parts[0].id == self.final_id and parts[0].kind == "final"
        if self.ops:
            for p in parts:
                self.ops_partition(p)
            firsts = [next((c for cs in self.ins[p.id] for c in cs), None) for p in parts]
            if len(parts) > 1 and all(firsts):  # stack the groups in order: g0 on top
                d.open(None, rank="same")
                for a, b in zip(firsts, firsts[1:]):
                    d.edge(a, b, {"style": "invis"})
                d.close()
        else:
            label = "final head" if only_final else f"module {module}"
            label += f" · G={len(parts)}" if len(parts) > 1 else ""
            d.open(None, rank="same")
            d.node(f"module_{module}", label=label, shape="plaintext", style="", fontsize="12")
            for p in parts:
                self.partition_node(p)
            names = [f"module_{module}"] + [p.name for p in parts]
            for a, b in zip(names, names[1:]):
                d.edge(a, b, {"style": "invis"})
            d.close()
            aux = [p for p in parts if p.id != self.final_id and p.head]
            for p in aux:
                self.aux_node(p)
                self.after[p.id] = 1
            if aux:
                self.same_rank([self.aux_in[p.id] for p in aux])
        self.hub_nodes(module, parts)

    # ------------------------------------------------------------------ ops level
    def op_node(self, p: Partition, n, prefix: str = "") -> str:
        """Add one IR op as a node (as its registry entry says: a box naming its unit, or a small ellipse);
        returns its id."""
        nid = self.nid(p, prefix + n.name)
        op = find_op(n.kind)
        tip = f"{n.source or n.name}: {n.kind} → {fmt_shape(n.shape)}, {fmt_count(n.macs)} MACs, {n.params} params"
        text = n.kind + (op.label(n.attrs) if op is not None else "")
        if op is not None and op.draw == "layer":
            self.d.node(nid, label=f"{n.source or n.name}\n{text} → {fmt_shape(n.shape)}", tooltip=tip, penwidth="1.2")
        else:
            self.d.node(nid, label=text, tooltip=tip, shape="ellipse", style="filled", fontsize="7",
                        height="0.2", margin="0.02,0.01")
        return nid

    def ops_partition(self, p: Partition) -> None:
        """Ops level: one cluster with the partition's body ops and its (collapsed or expanded) head."""
        d, final = self.d, p.id == self.final_id
        c = p.costs
        label = Html(f'<B>{esc(p.name)}</B>{"  — FINAL HEAD" if final else ""}<BR/><FONT POINT-SIZE="8">'
                     f'{fmt_count(c.get("fwd_macs", 0))} MACs · {fmt_count(c.get("params", 0))} params · '
                     f'{esc(self.place(p))}</FONT>')
        d.open(f"cluster_{p.name}", label=label, style="rounded,filled" + (",bold" if final else ""),
               fillcolor="#fff2cc" if final else self.fill[self.place(p)], color="#b8860b" if final else "#888888",
               penwidth="2.5" if final else "1", fontsize="10")
        inputs = [n.name for n in p.body if n.kind == "input"]
        cons: list[list[str]] = [[] for _ in inputs]
        compute = [n for n in p.body if n.kind != "input"]
        if not compute:  # the body only forwards its input (a head-only partition)
            nid = self.nid(p, "in")
            d.node(nid, label="in " + fmt_shape(p.body[-1].shape), shape="ellipse", style="filled", fontsize="7")
            cons = [[nid] for _ in inputs]
            self.out[p.id] = nid
        for n in compute:
            nid = self.op_node(p, n)
            for arg in n.args:
                if arg in inputs:
                    cons[inputs.index(arg)].append(nid)
                else:
                    d.edge(self.nid(p, arg), nid, edge_attrs("forward"))
            self.out[p.id] = nid
        self.ins[p.id] = cons
        if p.head and (final or self.heads):
            self.expanded_head(p, final)
        elif p.head:
            self.aux_node(p)
            d.open(None, rank="same")
            d.raw(f'"{self.out[p.id]}"; "{self.nid(p, "aux")}";')
            d.close()
        d.close()

    def expanded_head(self, p: Partition, final: bool) -> None:
        """Every op of a head (always for the final head, with ``heads=True`` for aux heads)."""
        d = self.d
        if not final:
            d.open(f"cluster_aux_{p.name}", label=f"aux head · {p.head_kind}{aux_from(p)}", style="rounded,dashed",
                   color="#666666", fontsize="8")
        roles: dict[str, int | None] = {}
        shares = iter(p.shares)
        for n in p.head:
            if n.kind == "input":
                s = None if n.name == "h" else next(shares, None)
                roles[n.name] = None if s is None else s.source
        self.share_in[p.id] = {}
        depth: dict[str, int] = {}
        for n in p.head:
            if n.kind == "input":
                continue
            depth[n.name] = 1 + max((depth.get(a, 0) for a in n.args), default=0)
            nid = self.op_node(p, n, "head.")
            for arg in n.args:
                if arg not in roles:
                    d.edge(self.nid(p, "head." + arg), nid, edge_attrs("forward"))
                elif roles[arg] is None:
                    d.edge(self.out[p.id], nid, edge_attrs("forward" if final else "aux"))
                else:
                    self.share_in[p.id].setdefault(roles[arg], []).append(nid)
        outs = p.head_outputs
        last = self.nid(p, "head." + (outs.get("logits") or outs.get("proj") or p.head[-1].name))
        self.aux_in[p.id] = last
        self.recon_in[p.id] = self.nid(p, "head." + outs["recon"]) if "recon" in outs else last
        self.after[p.id] = max(depth.values(), default=0)
        if final:
            self.pred_src = last
        else:
            d.close()

    def aux_node(self, p: Partition) -> None:
        """One node standing for a partition's aux head and local loss, fed by a dotted edge."""
        nid = self.nid(p, "aux")
        loss = p.loss.kind + (" + div" if p.loss.diversity_weight else "")
        head = p.head_kind + aux_from(p) + (" + MAN" if p.man else "")
        self.d.node(nid, label=f"aux {head}\n{fmt_count(p.costs.get('head_macs', 0))} MACs · {loss}",
                    shape="note", fontsize="8", style="filled")
        self.d.edge(self.out[p.id], nid, edge_attrs("aux"))
        self.share_in[p.id] = {s.source: [nid] for s in p.shares}
        self.aux_in[p.id] = self.recon_in[p.id] = nid

    # ------------------------------------------------------------------ partitions level
    def partition_node(self, p: Partition) -> None:
        """Partitions level: one box with name, MACs, parameters, units and placement."""
        final, c = p.id == self.final_id, p.costs
        units = p.units if len(p.units) <= 2 else [p.units[0], "…", p.units[-1]]
        lines = [f"<B>{esc(p.name)}</B>" + (" — FINAL HEAD" if final else ""),
                 f"{fmt_count(c.get('fwd_macs', 0))} MACs · {fmt_count(c.get('params', 0))} params"]
        if not self.big:
            lines.append(esc(" ".join(units) or p.head_kind))
        lines.append(esc(self.place(p)))
        nid = p.name
        self.d.node(nid, label=Html('<BR/>'.join(lines)), fillcolor=FINAL_FILL if final else self.fill[self.place(p)],
                    penwidth="2.5" if final else "1", style="rounded,filled" + (",bold" if final else ""),
                    fontsize="8" if self.big else "9")
        self.out[p.id] = nid
        self.ins[p.id] = [[nid] for _ in p.inputs]
        if final:
            self.pred_src = nid

    def row_headers(self) -> None:
        """Ops level in rows: a label node per module, all in the first column, in module order;
        each module's first ops follow its label."""
        d, heads = self.d, []
        for module, parts in self.plan.by_module().items():
            hid = f"row_{module}"
            final = len(parts) == 1 and parts[0].id == self.final_id
            d.node(hid, label="final head" if final else f"module {module}" + (f"\nG={len(parts)}" if len(parts) > 1
                                                                                  else ""),
                   shape="plaintext", style="", fontsize="12")
            heads.append(hid)
            for p in parts:
                for c in dict.fromkeys(c for cs in self.ins.get(p.id, []) for c in cs):
                    d.edge(hid, c, {"style": "invis"})
        self.same_rank(["image"] + heads)
        for a, b in zip(["image"] + heads, heads):
            d.edge(a, b, {"style": "invis"})
