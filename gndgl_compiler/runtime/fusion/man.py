"""The fused form of MAN++'s learned mix (DESIGN §2.3): ``man_mix`` of all G aux nets at once.

    man_mix   stack (B, G·c, ...) or gtok (G, B, N, c)   y_g = s_g·LB_g + (2 − s_g)·EMA_g

The G scalars s_g become one fused (G,) storage (partition g's ``s`` is its element g); each is broadcast over
its own group's channels (in an unequal split, its padded ones too: LB and EMA are exact zeros there, so the
output stays zero and s_g's gradient gets nothing from them). MAN's plain mix is the table's ``add``. The EMA
unit's frozen parameters fuse like any other (``storage.fuse`` without a gradient); the EMA step over fused
storage is ``runtime/step/man_ema.py``.
"""

from __future__ import annotations

from .layouts import FusionBuild, NodeGroup, NotFusable, Step


def man_mix(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """``s_g·lb + (2 − s_g)·ema`` over the G groups' LB and EMA outputs (one layout, stack or gtok).

    Raises:
        NotFusable: the two inputs differ in layout, or are neither a stack nor tokens.
    """
    lays, name, (lb, ema) = grp.layouts, grp.name, grp.node.args
    if lays[0] != lays[1] or lays[0] not in ("stack", "gtok"):
        raise NotFusable(f"man_mix {name} of {lays[0]} and {lays[1]} tensors")
    s = b.fuse([m.s for m in grp.modules()])
    G, lay = b.G, lays[0]

    def step(env: dict) -> None:
        x, e = env[lb], env[ema]
        if lay == "gtok":  # (G, B, N, c): group-major
            sv = s.fused.view(G, *([1] * (x.dim() - 1)))
        else:  # (B, G·c, ...): group g's channels g·c .. (g+1)·c (c the padded width)
            c = x.shape[1] // G
            sv = s.fused.view(G, 1).expand(G, c).reshape(1, G * c, *([1] * (x.dim() - 2)))
        env[name] = sv * x + (2.0 - sv) * e
    return step, lay
