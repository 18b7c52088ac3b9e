"""The fused form of the ops that wire values together: ``slice``, ``cat`` and ``add``.

    op     shared in                        stack / gstack in        mixed / gtok in
    slice  group g's channels: the shared   —                        mixed: a head's own channels
           value itself when they tile it,                           (live) as a stack
           else gathered into a stack
    cat    dense (all shared inputs)        —                        an aux head's input: cat(own live,
                                                                     siblings' shares detached) → mixed
    add    as is                            as is (same layouts)     gtok + gtok (a stack operand made gtok)

No parameters.
"""

from __future__ import annotations

import torch

from .layouts import FusionBuild, NodeGroup, NotFusable, Step, alias, call
from .padded import shortcut_gather


def channel_slice(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """Group g's channel slice of a shared value, for all groups: the shared value itself when the slices
    are its equal tiles in group order, else gathered (``shortcut_gather``); a stack.

    Raises:
        NotFusable: a slice of a per-group value.
    """
    ns, lay, G = grp.nodes, grp.layout, b.G
    n = ns[0]
    if lay == "mixed":
        return _own_slice(b, grp), "stack"
    if lay != "shared":
        raise NotFusable(f"slice {n.name} of a {lay} tensor")
    channels = next(m.shape for m in grp.lists[0] if m.name == n.args[0])[0]
    starts, lengths = [m.attrs["start"] for m in ns], [m.attrs["length"] for m in ns]
    w = lengths[0]
    if lengths == [w] * G and starts == [g * w for g in range(G)] and channels == G * w:
        return alias(n.name, n.args[0]), "stack"
    return shortcut_gather(n.name, n.args[0], starts, lengths, channels, b.device), "stack"


def _own_slice(b: FusionBuild, grp: NodeGroup) -> Step:
    """Each head's slice of its mixed input when it is the head's own group's channels (a residual shortcut
    in MAN's LB / EMA copy of the next module's first unit): those channels are live, so the slice is the
    module output itself when each slice is its group's whole block (padded too: the rest of a padded block is
    exact zeros), else gathered from it (equal widths).

    Raises:
        NotFusable: a slice that reads a sibling's (detached) channels, or part of a group's block when padded.
    """
    ns, c = grp.nodes, b.width
    got = b.channel_maps.get(grp.arg)
    rows = []
    for g, m in enumerate(ns):
        cols = torch.arange(m.attrs["start"], m.attrs["start"] + m.attrs["length"])
        rows.append(cols if got is None else got[0][g].index_select(0, cols))
    if all(torch.equal(r, torch.arange(g * c, g * c + w)) for g, (r, w) in enumerate(zip(rows, b.widths))):
        def own(env: dict) -> None:
            env[grp.name] = env[grp.arg][0]
        return own
    if b.padded or len({len(r) for r in rows}) != 1 \
            or not all(bool((r // c == g).all()) for g, r in enumerate(rows)):
        raise NotFusable(f"slice {grp.name} of a head input that is not each head's own channels")
    flat = torch.cat(rows).to(b.device)

    def gather(env: dict) -> None:
        env[grp.name] = env[grp.arg][0].index_select(1, flat)
    return gather


def cat(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """In a body, the concatenation of shared values (shared); in an aux head, its input (mixed)."""
    if grp.head:
        return _head_input(b, grp), "mixed"
    if set(grp.layouts) != {"shared"}:
        raise NotFusable(f"cat {grp.name} of group tensors")
    return call(grp.name, torch.cat, grp.node.args, dim=1, listed=True), "shared"


def _head_input(b: FusionBuild, grp: NodeGroup) -> Step:
    """``cat(own live, siblings' first k channels detached)`` → a mixed value.

    Any share ratio and any order of the cat: head g's input channels are mapped to channels of the
    whole module output h (``b.channel_maps``: a (G, C_in) index, or None for the identity, r = 1 in group
    order); a conv or linear layer over the mixed value then runs over all of h with head g's weight
    columns scattered to the channels it reads (zeros elsewhere: the same value, exactly).
    """
    G, c, widths, parts = b.G, b.width, b.widths, b.parts
    by_id = {q.id: q.group for q in parts}
    cols = []
    for g, (n, p) in enumerate(zip(grp.nodes, parts)):
        share_names = [m.name for m in grp.lists[g] if m.kind == "input"][1:]
        read = {"h": (g, widths[g])}
        for nm, s in zip(share_names, p.shares):
            if s.source not in by_id or s.channels > widths[by_id[s.source]]:
                raise NotFusable("aux head shares are not this module's sibling outputs")
            read[nm] = (by_id[s.source], s.channels)
        if any(a not in read for a in n.args) or "h" not in n.args \
                or len({read[a][0] for a in n.args}) != len(n.args):
            raise NotFusable("aux head input is not the module output and sibling shares")
        cols.append(torch.cat([torch.arange(read[a][0] * c, read[a][0] * c + read[a][1]) for a in n.args]))
    # padded: a head reading fewer channels reads, in its padded columns, a padded (zero) channel of h
    # (the narrowest group's last; its weight there is a padded zero, so the scatter's duplicates agree)
    dummy = min(range(G), key=lambda q: widths[q]) * c + c - 1
    width = max(len(col) for col in cols)
    idx = torch.stack([torch.cat([col, col.new_full((width - len(col),), dummy)]) for col in cols])
    full = G * c
    ident = idx.shape[1] == full and torch.equal(idx, torch.arange(full).expand(G, full))
    name = grp.name
    b.channel_maps[name] = None if ident else (idx, full)

    def step(env: dict) -> None:
        live = env["h"]
        env[name] = (live,)  # a mixed value: per head, own slice live, the others constants
    return step


def add(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """The sum of two values of one layout; with tokens, a stack operand is made gtok first."""
    lays, name, args = grp.layouts, grp.name, grp.node.args
    if "gtok" in lays:
        if set(lays) - {"gtok", "stack"}:
            raise NotFusable(f"add {name} of {lays[0]} and {lays[1]} tensors")

        def tokens(env: dict) -> None:
            x, y = (b.tokens(env[a], lay) for a, lay in zip(args, lays))
            env[name] = x + y
        return tokens, "gtok"
    if lays[0] != lays[1] or lays[0] == "mixed":
        raise NotFusable(f"add {name} of {lays[0]} and {lays[1]} tensors")
    return call(name, torch.add, args), lays[0]
