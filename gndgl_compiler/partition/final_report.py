"""What a plan's final head is, what of the model it replaced, and what compile should say about it.

A spec's ``local.final_head.kind: auto`` gives a cut CNN a ``1c2f`` final head (the paper's),
which replaces the model's own classifier units (a hand-written ``linear``, say); a head larger
than the classifier it replaced can make the compiled network slower at inference than the
model itself. :func:`final_head_report` says both, for ``gndgl compile`` and its ``--json``.
"""

from __future__ import annotations

from typing import Any

from ..graph.build import OpGraph
from ..spec.models import Spec
from ..viz.style import fmt_count
from .plan import PartitionPlan

KEEP_OWN = "local.final_head.kind: model"
"""The spec setting that keeps the model's own classifier as the final head."""


def final_head_report(spec: Spec, og: OpGraph, plan: PartitionPlan) -> dict[str, Any]:
    """The final head of ``plan`` and the model classifier it stands in for.

    Args:
        spec: the validated spec the plan was compiled from.
        og: its op graph (for the model's own classifier units).
        plan: the compiled plan (costs annotated).

    Returns:
        ``kind`` (1c2f, linear or model), ``chosen_by`` (``default`` for ``kind: auto``, else
        ``spec``), ``params`` / ``macs`` of the head, ``replaces`` (the model's classifier units
        it replaced; empty when it is the model's own), ``replaced_params`` / ``replaced_macs``,
        ``keep_own`` (the setting that keeps the model's classifier), and ``notes`` and
        ``warnings`` (sentences for the user).
    """
    final = plan.final
    kind = final.head_kind.removeprefix("final:")
    own = og.classifier
    own_nodes = [og.node(n) for n in own.nodes]
    replaces = [] if kind == "model" else list(own.units)
    report: dict[str, Any] = {
        "kind": kind,
        "chosen_by": "default" if spec.local.final_head.kind == "auto" else "spec",
        "params": sum(n.params for n in final.head),
        "macs": final.costs["head_macs"],
        "replaces": replaces,
        "replaced_params": sum(d["params"] for d in own_nodes),
        "replaced_macs": sum(d["macs"] for d in own_nodes),
        "keep_own": KEEP_OWN if replaces else None,
        "notes": [],
        "warnings": [],
    }
    if replaces and report["chosen_by"] == "default":
        report["notes"].append(
            f"final head: the default {kind} head ({fmt_count(report['params'])} params) replaces the model's own "
            f"classifier ({' '.join(replaces)}: {fmt_count(report['replaced_params'])} params); to keep yours, set "
            f"{KEEP_OWN}")
    speedup = plan.summary["inference_speedup"]
    if speedup < 1:
        why = ""
        if replaces and report["macs"] > report["replaced_macs"]:
            why = (f", because its {kind} final head ({fmt_count(report['macs'])} MACs) costs more than the "
                   f"classifier it replaced ({fmt_count(report['replaced_macs'])} MACs); {KEEP_OWN} keeps the "
                   "model's own")
        report["warnings"].append(
            f"inference speed-up {speedup:.2f}× is below 1: the compiled network does more MACs per image "
            f"({fmt_count(plan.summary['inference_macs'])}) than the model end to end "
            f"({fmt_count(plan.summary['e2e_macs'])}){why}")
    return report
