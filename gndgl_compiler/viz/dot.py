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
"""

from __future__ import annotations

from ..graph.ops import OPS
from ..partition.plan import IMAGE, Partition, PartitionPlan
from .style import (FINAL_FILL, FONT, IMAGE_FILL, PALETTE, Dot, Html, edge_attrs, esc, fmt_bytes, fmt_count,
                    fmt_shape, legend)

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


class _Builder:
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

    def moves(self, a: int, b: int) -> bool:
        """True when partitions a and b sit on different devices or workers."""
        if a == IMAGE or b == IMAGE:
            return False
        pa, pb = self.by_id[a], self.by_id[b]
        return (pa.device, pa.worker) != (pb.device, pb.worker)

    def blabel(self, n: int) -> str | None:
        """Edge label for ``n`` bytes per sample (none on big graphs)."""
        return None if self.big else fmt_bytes(n)

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
        """Add one IR op as a node (boxes for parametric ops, small ellipses otherwise); returns its id."""
        nid = self.nid(p, prefix + n.name)
        a = n.attrs
        tip = f"{n.source or n.name}: {n.kind} → {fmt_shape(n.shape)}, {fmt_count(n.macs)} MACs, {n.params} params"
        if n.kind in OPS and OPS[n.kind].parametric:
            k = {"conv": f"{a.get('kernel')}×{a.get('kernel')}", "patch_embed": f" {a.get('patch')}×{a.get('patch')}",
                 "attention": f" {a.get('heads')}h", "mlp": f" {a.get('hidden')}"}.get(n.kind, "")
            s = f"/{a['stride']}" if a.get("stride", 1) > 1 else ""
            label = f"{n.source or n.name}\n{n.kind}{k}{s} → {fmt_shape(n.shape)}"
            self.d.node(nid, label=label, tooltip=tip, penwidth="1.2")
        else:
            label = n.kind + (f" [{a['start']}:{a['start'] + a['length']}]" if n.kind == "slice" else "")
            self.d.node(nid, label=label, tooltip=tip, shape="ellipse", style="filled", fontsize="7",
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
            d.open(f"cluster_aux_{p.name}", label=f"aux head · {p.head_kind}", style="rounded,dashed",
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
        self.d.node(nid, label=f"aux {p.head_kind}\n{fmt_count(p.costs.get('head_macs', 0))} MACs · {loss}",
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

    def row_edge(self, src: int, dst: int, attrs: dict) -> dict:
        """In rows, an edge from one module into the next does not rank its head (the row wraps)."""
        if self.rows and src != IMAGE and self.by_id[src].module != self.by_id[dst].module:
            attrs = {**attrs, "constraint": "false"}
            attrs.pop("minlen", None)
        return attrs

    def gap(self, src: int) -> int:
        """Rank distance from a partition's output to the concat junction after it."""
        after = self.after.get(src, 0)
        return 1 + after if self.ops else max(1, after)

    def same_rank(self, nodes: list[str]) -> None:
        """Put ``nodes`` in one rank (one column, as the layout runs left to right)."""
        self.d.open(None, rank="same")
        self.d.raw(" ".join(f'"{n}";' for n in nodes))
        self.d.close()

    # ------------------------------------------------------------------ edges between partitions
    def activation_edges(self) -> None:
        """Image inputs and detached activations between partitions (through concat junctions)."""
        d = self.d
        junctions: dict[tuple[int, ...], list[int]] = {}
        for p in self.plan.partitions:
            act = [(k, i) for k, i in enumerate(p.inputs) if i.source != IMAGE]
            for k, i in enumerate(p.inputs):
                if i.source == IMAGE:
                    for c in self.ins[p.id][k] if k < len(self.ins[p.id]) else []:
                        lab = self.blabel(self.nbytes.get((IMAGE, p.id, "image"), 0))
                        d.edge("image", c, edge_attrs("image", label=lab))
            srcs = tuple(sorted({i.source for _, i in act}))
            if len(srcs) > 1:
                junctions.setdefault(srcs, []).append(p.id)
            for k, i in act if len(srcs) == 1 else []:
                for c in self.ins[p.id][k]:
                    lab = self.blabel(self.nbytes.get((i.source, p.id, "activation"), 0))
                    d.edge(self.out[i.source], c, self.row_edge(i.source, p.id, edge_attrs(
                        "sg", self.moves(i.source, p.id), label=lab, minlen=str(1 + self.after.get(i.source, 0)))))
            if not any(i.source == IMAGE for i in p.inputs) and (IMAGE, p.id, "image") in self.nbytes:
                self.has.add("recon")
                d.edge("image", self.recon_in.get(p.id, self.out[p.id]), edge_attrs("recon", constraint="false"))
        for j, (srcs, dsts) in enumerate(junctions.items()):
            first = self.by_id[dsts[0]]
            total = sum(self.nbytes.get((s, first.id, "activation"), 0) for s in srcs)
            jid = f"concat_{j}"
            sizes = {self.nbytes.get((s, first.id, "activation"), 0) for s in srcs}
            size = f"{len(srcs)} × {fmt_bytes(sizes.pop())}" if len(sizes) == 1 else fmt_bytes(total)
            d.node(jid, label=f"concat\n{size}", shape="box", style="rounded,dashed", fontsize="7",
                   height="0.2", margin="0.03,0.01", color="#444444")
            for s in srcs:
                d.edge(self.out[s], jid, self.row_edge(s, first.id, edge_attrs(
                    "sg", any(self.moves(s, t) for t in dsts), arrowhead="none", minlen=str(self.gap(s)))))
            if self.rows:
                d.edge(f"row_{first.module}", jid, {"style": "invis"})
            for t in dsts:
                for c in dict.fromkeys(x for k, i in enumerate(self.by_id[t].inputs) if i.source != IMAGE
                                       for x in self.ins[t][k]):
                    d.edge(jid, c, edge_attrs("sg", any(self.moves(s, t) for s in srcs)))

    def hub_nodes(self, module: int, parts: list[Partition]) -> None:
        """Create the module's sharing / diversity hubs (when bundling) inside its cluster."""
        ids = {p.id for p in parts}
        shares = [e for e in self.plan.edges if e.kind == "share" and e.dst in ids]
        pairs = sorted({tuple(sorted((e.src, e.dst))) for e in self.plan.edges
                        if e.kind == "diversity" and e.dst in ids})
        hub = self.bundle if self.bundle is not None else len(parts) >= 4
        self.sib[module] = (shares, pairs, hub)
        if shares and hub:
            ch = sorted({s.channels for p in parts for s in p.shares})
            self.d.node(f"share_hub_{module}", label=f"share\n{'/'.join(map(str, ch))} ch each", shape="box",
                        style="rounded,filled", fillcolor="#e8f0fe", color="#1f5fbf", fontcolor="#1f5fbf",
                        fontsize="7", height="0.2")
        if pairs and hub:
            loss = parts[0].loss
            self.d.node(f"diversity_hub_{module}", shape="ellipse", style="filled", fillcolor="#fff0e0",
                        label=f"diversity\nw={loss.diversity_weight:g} T={loss.diversity_temperature:g}",
                        color="#f28e00", fontcolor="#c06000", fontsize="7", height="0.2")

    def sibling_edges(self) -> None:
        """Sibling sharing (blue) and diversity exchange (orange, one edge per pair), or their hubs."""
        d = self.d
        for module, parts in self.plan.by_module().items():
            ids = {p.id for p in parts}
            shares, pairs, hub = self.sib[module]
            if shares and hub:
                sid = f"share_hub_{module}"
                srcs = sorted({e.src for e in shares})
                for s in srcs:
                    d.edge(self.out[s], sid, edge_attrs("share", any(self.moves(s, t) for t in ids), arrowhead="none"))
                targets = []
                for p in parts:
                    for c in dict.fromkeys(x for v in self.share_in.get(p.id, {}).values() for x in v):
                        targets.append(c)
                        d.edge(sid, c, edge_attrs("share", any(self.moves(s, p.id) for s in srcs)))
                self.same_rank([sid] + targets[:1])
            for e in shares if not hub else []:
                for c in self.share_in.get(e.dst, {}).get(e.src, []):
                    d.edge(self.out[e.src], c, edge_attrs("share", self.moves(e.src, e.dst),
                                                          label=self.blabel(e.bytes_per_sample)))
            if pairs and hub:
                did = f"diversity_hub_{module}"
                self.same_rank([did] + [self.aux_in[p.id] for p in parts if p.id in self.aux_in][:1])
                for p in parts:
                    if p.id in self.aux_in and any(p.id in pr for pr in pairs):
                        d.edge(self.aux_in[p.id], did, edge_attrs("diversity", any(self.moves(p.id, q) for q in ids),
                                                                   constraint="true"))
            for a, b in pairs if not hub else []:
                if a in self.aux_in and b in self.aux_in:
                    d.edge(self.aux_in[a], self.aux_in[b], edge_attrs("diversity", self.moves(a, b)))
