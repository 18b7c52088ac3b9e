"""A partition plan as a rich tree: modules → partitions with MACs, parameters and placement."""

from __future__ import annotations

from typing import Any

from ..partition.plan import PartitionPlan
from .style import aux_from, fmt_bytes, fmt_count


def plan_tree(plan: PartitionPlan, max_groups: int = 16) -> Any:
    """Build a :class:`rich.tree.Tree` of the plan.

    Args:
        plan: the compiled plan.
        max_groups: show at most this many partitions per module (first and last ones).

    Returns:
        The tree (print it with a rich console).
    """
    from rich.markup import escape
    from rich.tree import Tree

    gs = sorted(set(plan.groups))
    g = str(gs[0]) if len(gs) == 1 else str(plan.groups)
    root = Tree(f"[bold]{escape(plan.name)}[/] · K={plan.num_modules} · G={g} · {len(plan.partitions)} partitions · "
                f"final head {plan.final_mode} · {plan.schedule} schedule", guide_style="dim")
    root.add(f"[dim]image[/] {'×'.join(map(str, plan.input_shape))} → {plan.num_classes} classes")
    workers = plan.workers > 1
    for module, parts in plan.by_module().items():
        only_final = len(parts) == 1 and parts[0].id == plan.final.id and parts[0].kind == "final"
        first = parts[0]
        units = first.units
        span = "" if not units else f" [dim]{escape(units[0])}{' … ' + escape(units[-1]) if len(units) > 1 else ''}[/]"
        extra = [f"aux {escape(first.head_kind + aux_from(first))}"] if first.id != plan.final.id else []
        if first.shares:
            extra.append("[blue]sharing[/]")
        if first.loss.diversity_weight:
            extra.append(f"[dark_orange]diversity w={first.loss.diversity_weight:g}[/]")
        if first.man is not None:
            extra.append(f"[magenta]MAN ({first.man.mix}, m={first.man.momentum:g}) ← "
                         f"{escape(plan.partitions[first.man.source].units[0])}[/]")
        title = ("[bold yellow]final head[/]" if only_final else
                 f"[bold]module {module}[/] · {len(parts)} group{'s' if len(parts) > 1 else ''}{span}")
        branch = root.add(title + "".join(" · " + e for e in extra))
        shown = parts if len(parts) <= max_groups else parts[: max_groups // 2] + parts[-max_groups // 2:]
        for i, p in enumerate(shown):
            if len(parts) > max_groups and i == max_groups // 2:
                branch.add(f"[dim]… {len(parts) - max_groups} more[/]")
            c = p.costs
            place = p.device + (f"/w{p.worker}" if workers else "")
            final = p.id == plan.final.id
            name = f"[bold yellow]{escape(p.name)}[/]" if final else f"[cyan]{escape(p.name)}[/]"
            tail = f" · classifier {escape(p.head_kind.removeprefix('final:'))}" if final else ""
            branch.add(f"{name}  {fmt_count(c.get('fwd_macs', 0))} MACs · {fmt_count(c.get('params', 0))} params · "
                       f"{place} · in {fmt_bytes(c.get('bytes_in', 0))}{tail}")
    return root


def summary_line(plan: PartitionPlan) -> str:
    """One line of rich markup: MACs and the training / inference speed-ups."""
    s = plan.summary or {}
    if "training_speedup" not in s:
        return f"{len(plan.partitions)} partitions"
    return (f"end-to-end {fmt_count(s['e2e_macs'])} MACs · max partition {fmt_count(s['max_partition_macs'])} MACs · "
            f"inference {fmt_count(s['inference_macs'])} MACs · "
            f"training speed-up [bold green]{s['training_speedup']:.2f}×[/]"
            f" · inference speed-up [bold green]{s['inference_speedup']:.2f}×[/] · params {fmt_count(s['params'])}")


def print_plan_tree(plan: PartitionPlan, console: Any = None) -> None:
    """Print :func:`plan_tree` and :func:`summary_line` to ``console`` (default: a new rich Console)."""
    from rich.console import Console

    console = console or Console()
    console.print(plan_tree(plan), highlight=False)
    console.print(summary_line(plan), highlight=False)
