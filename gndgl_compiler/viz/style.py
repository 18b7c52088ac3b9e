"""DOT text building blocks: quoting, number formats, colours and edge styles.

Everything here is plain string work (no pydot, no graphviz), so building a DOT
graph needs nothing beyond the standard library.
"""

from __future__ import annotations

import html
from typing import Any

PALETTE = ["#cfe2f3", "#d9ead3", "#fce5cd", "#ead1dc", "#fff2cc", "#d0e0e3", "#f4cccc", "#d9d2e9",
           "#b6d7a8", "#a4c2f4", "#f9cb9c", "#b4a7d6", "#a2c4c9", "#ea9999", "#ffe599", "#d5a6bd"]
"""Pastel fills, one per device / worker (cycled when there are more)."""

FINAL_FILL = "#ffd966"
IMAGE_FILL = "#e0e0e0"
FONT = "Helvetica"

EDGE_STYLES: dict[str, dict[str, str]] = {
    "forward": {"color": "black", "style": "solid"},
    "sg": {"color": "#444444", "style": "dashed", "arrowhead": "teenormal"},
    "aux": {"color": "#333333", "style": "dotted", "arrowhead": "empty", "penwidth": "1.3"},
    "share": {"color": "#1f5fbf", "fontcolor": "#1f5fbf", "style": "dashed", "arrowhead": "teenormal"},
    "diversity": {"color": "#f28e00", "fontcolor": "#c06000", "style": "dotted", "dir": "both",
                  "penwidth": "1.6", "constraint": "false"},
    "image": {"color": "black", "style": "solid", "penwidth": "1.4"},
    "recon": {"color": "#888888", "fontcolor": "#666666", "style": "dashed", "arrowhead": "odot"},
    "weight": {"color": "#7b3294", "fontcolor": "#7b3294", "style": "dashed", "arrowhead": "diamond",
               "penwidth": "1.6", "constraint": "false"},
}
"""Edge attributes by kind: data inside a partition ('forward'), detached boundary
crossings ('sg'), aux-head edges, sibling sharing, diversity softmax exchange, the
image input, InfoPro's reconstruction target and MAN's weight edge (U's parameters to the EMA unit of
the module before, forward only, once per step)."""

TRANSFER = {"color": "#d62728", "fontcolor": "#d62728", "penwidth": "2.6"}
"""Overrides for an edge that crosses devices or workers (bold red)."""

LEGEND = [
    ("forward", "forward data inside a partition"),
    ("sg", "detached input (stop-gradient, sg)"),
    ("aux", "to the auxiliary head (local loss)"),
    ("share", "sibling sharing (detached)"),
    ("diversity", "diversity softmax exchange"),
    ("transfer", "cross-device / worker transfer"),
]


class Html(str):
    """A DOT HTML-like label (written as ``<...>`` instead of a quoted string)."""


def quote(value: Any) -> str:
    """Quote a DOT ID or attribute value.

    Args:
        value: any value; :class:`Html` values are wrapped in ``<>``.

    Returns:
        The DOT text of the value.
    """
    if isinstance(value, Html):
        return f"<{value}>"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def esc(text: Any) -> str:
    """Escape text for use inside an :class:`Html` label."""
    return html.escape(str(text), quote=True)


def attrs(values: dict[str, Any]) -> str:
    """Format an attribute list ``[a="1", b="2"]`` (empty string for none)."""
    items = [f"{k}={quote(v)}" for k, v in values.items() if v is not None]
    return f" [{', '.join(items)}]" if items else ""


def fmt_count(n: float) -> str:
    """Short count: 69.1M, 1.2k, 512."""
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{int(n)}"


def fmt_bytes(n: float) -> str:
    """Short byte size: 16.0 KiB."""
    n = float(n)
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def fmt_shape(shape: list[int]) -> str:
    """Per-sample shape as ``16×32×32``."""
    return "×".join(str(s) for s in shape)


def edge_attrs(kind: str, transfer: bool = False, **extra: Any) -> dict[str, Any]:
    """Attributes of an edge of ``kind`` (see :data:`EDGE_STYLES`).

    Args:
        kind: one of the keys of :data:`EDGE_STYLES`.
        transfer: the edge crosses devices or workers (drawn bold red).
        extra: further attributes (label, ...).

    Returns:
        A new attribute dict.
    """
    out: dict[str, Any] = dict(EDGE_STYLES[kind])
    if transfer:
        out.update(TRANSFER)
        out["style"] = ",".join(s for s in (out.get("style", "solid"), "bold") if s != "solid")
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


class Dot:
    """Accumulates DOT statements with indentation.

    Args:
        name: the graph name.
        graph: graph attributes.
        node: default node attributes.
        edge: default edge attributes.
    """

    def __init__(self, name: str, graph: dict[str, Any], node: dict[str, Any], edge: dict[str, Any]):
        self.lines = [f"digraph {quote(name)} {{"]
        self.depth = 1
        self.raw(f"graph{attrs(graph)};")
        self.raw(f"node{attrs(node)};")
        self.raw(f"edge{attrs(edge)};")

    def raw(self, text: str) -> None:
        """Append one statement at the current depth."""
        self.lines.append("  " * self.depth + text)

    def node(self, nid: str, **a: Any) -> None:
        """Add a node with attributes."""
        self.raw(f"{quote(nid)}{attrs(a)};")

    def edge(self, src: str, dst: str, a: dict[str, Any] | None = None) -> None:
        """Add an edge ``src -> dst`` with attributes ``a``."""
        self.raw(f"{quote(src)} -> {quote(dst)}{attrs(a or {})};")

    def open(self, name: str | None = None, **a: Any) -> None:
        """Open a (cluster) subgraph; ``name=None`` opens an anonymous one."""
        self.raw(("subgraph " + quote(name) + " {") if name else "{")
        self.depth += 1
        for k, v in a.items():
            self.raw(f"{k}={quote(v)};")

    def close(self) -> None:
        """Close the innermost subgraph."""
        self.depth -= 1
        self.raw("}")

    def text(self) -> str:
        """The finished DOT source."""
        return "\n".join(self.lines + ["}"]) + "\n"


def legend(d: Dot, placements: dict[str, str], has: set[str]) -> None:
    """Add ``cluster_legend``: one sample edge per edge kind and one swatch per placement.

    Args:
        d: the graph being built.
        placements: placement label → fill colour.
        has: extra entries to show ('final', 'recon').
    """
    d.open("cluster_legend", label="legend", style="rounded,filled", fillcolor="white", color="#999999",
           fontsize="11", fontname=FONT)
    rows = list(LEGEND) + ([("recon", "image as reconstruction target")] if "recon" in has else [])
    rows += [("weight", "MAN weight edge: U's parameters → EMA unit (no gradient)")] if "weight" in has else []
    for col, make in (("a", lambda i, t: d.node(f"legend_a{i}", label="", shape="point", width="0.06")),
                      ("b", lambda i, t: d.node(f"legend_b{i}", label=t, shape="plaintext", fontsize="10",
                                                style="", height="0.2"))):
        d.open(None, rank="same")
        for i, (_, text) in enumerate(rows):
            make(i, text)
        for i in range(len(rows) - 1):  # keep the rows in order (top to bottom)
            d.edge(f"legend_{col}{i + 1}", f"legend_{col}{i}", {"style": "invis"})
        d.close()
    for i, (kind, _) in enumerate(rows):
        a = edge_attrs("sg" if kind == "transfer" else kind, transfer=kind == "transfer")
        a.update(constraint="true", minlen="2")
        d.edge(f"legend_a{i}", f"legend_b{i}", a)
    for j, (label, color) in enumerate(placements.items()):
        d.node(f"legend_p{j}", label=label, shape="box", style="rounded,filled", fillcolor=color, fontsize="9")
    if "final" in has:
        d.node("legend_final", label="final head (classifier)", shape="box", style="rounded,filled,bold",
               fillcolor=FINAL_FILL, penwidth="2", fontsize="9")
    d.close()


def aux_from(p: Any) -> str:
    """`` ← s2.b2, s3.b4``: the later units a partition's auglocal aux net copies ('' for other heads)."""
    return f" ← {', '.join(p.aux_units)}" if p.aux_units else ""
