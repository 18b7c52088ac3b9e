"""Sibling fusion: a module's G partitions, on one device, run as one program (DESIGN §2).

The G partitions of a module have the same IR (same node names and kinds; only the channel slice
differs), so each IR node becomes one fused op over all G groups, built by its kind's entry of the
fused-op table (``table.py``: :class:`FusedOpDef`, looked up like ``graph/ops.py``'s op registry):

    layouts.py      the value layouts, one node of all siblings (NodeGroup), the stage being built
                    (FusionBuild: fused tensors, channel maps, real widths), NotFusable
    table.py        FUSED_OPS: one entry per fused op kind; fused_registry / extra_fused_ops
    conv.py         conv, linear            pointwise.py  bn, activations, pools, flatten, l2norm
    wiring.py       slice, cat, add         tokens.py     the ViT ops
    dropout.py      dropout, each group's mask from its own partition's generator
    man.py          MAN++'s learned mix (man_mix): one s per group
    padded.py       unequal group widths: groups padded with exact-zero channels
    shared_head.py  the aux heads' first layer over cat(own live, siblings detached)
    storage.py      per-partition parameters as views of one fused storage per layer
    loss.py         the batched local losses (cross-entropy, predsim, InfoPro, diversity)
    compile.py      node lists → fused steps, by the table
    stage.py        FusedStage: checks the siblings, compiles bodies and aux heads, runs them with the losses
    runner.py       SiblingFusedRunner: its stage runner, replacing the per-partition runner for the module

The ``mixed`` aux-head input is exact: conv(cat(own live, siblings' first k channels detached), W_g)
has the value conv(h, W_g') with W_g's columns scattered to the channels of h it reads (any share
ratio), the weight gradient of that conv, and an input gradient that reaches group g's body only
through W_g's own columns (``shared_head.py``). Dropout is exact too. Unequal group widths (a balanced
split) fuse padded. What cannot be expressed this way (differing siblings, an op kind without an entry,
a sigmoid or a token op in an unequal split, ...) raises :class:`NotFusable` with the reason, and the
executor runs that module partition by partition.
"""

from .layouts import NotFusable
from .runner import SiblingFusedRunner
from .stage import FusedStage
from .table import FUSED_OPS, FusedOpDef, extra_fused_ops, find_fused_op, fused_registry

__all__ = ["FUSED_OPS", "FusedOpDef", "FusedStage", "NotFusable", "SiblingFusedRunner", "extra_fused_ops",
           "find_fused_op", "fused_registry"]
