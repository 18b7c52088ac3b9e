"""Edges between partitions in the DOT picture: image inputs, detached activations through
``concat`` junctions, sibling sharing and diversity (direct, or through one hub per module),
the image as InfoPro's reconstruction target, and MAN's weight edges (U's parameters, no gradient).

:class:`PartitionEdges` is a mixin of :class:`gndgl_compiler.viz.dot._Builder`, which supplies the
node ids it connects (``out``, ``ins``, ``share_in``, ``aux_in``, ``recon_in``) and the graph ``d``.
"""

from __future__ import annotations

from ..partition.plan import IMAGE, Partition
from .style import edge_attrs, fmt_bytes


class PartitionEdges:
    """Edge drawing of the DOT builder (see the module docstring)."""

    def moves(self, a: int, b: int) -> bool:
        """True when partitions a and b sit on different devices or workers."""
        if a == IMAGE or b == IMAGE:
            return False
        pa, pb = self.by_id[a], self.by_id[b]
        return (pa.device, pa.worker) != (pb.device, pb.worker)

    def blabel(self, n: int) -> str | None:
        """Edge label for ``n`` bytes per sample (none on big graphs)."""
        return None if self.big else fmt_bytes(n)

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

    def weight_edges(self) -> None:
        """MAN's weight edges: from U's partition to the aux net of the module before (purple, diamond head),
        labelled with the bytes sent once per step."""
        for e in self.plan.edges:
            if e.kind != "weight":
                continue
            self.has.add("weight")
            dst = self.aux_in.get(e.dst, self.out[e.dst])
            lab = None if self.big else f"θ_U {fmt_bytes(e.bytes_per_step)}/step"
            self.d.edge(self.out[e.src], dst, edge_attrs("weight", self.moves(e.src, e.dst), xlabel=lab))

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
