"""``gndgl compile``, ``gndgl inspect`` and ``gndgl schema``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from gndgl_compiler import compile_spec, load_artifact
from gndgl_compiler.api import Artifact
from gndgl_compiler.spec.models import Spec

from .common import console, fmt_bytes, fmt_int


def summary_json(art: Artifact) -> dict:
    """Machine-readable summary of an artifact (what ``--json`` prints)."""
    return {
        "name": art.plan.name,
        "path": str(art.path) if art.path else None,
        "modules": art.plan.num_modules,
        "groups": art.plan.groups,
        "final_mode": art.plan.final_mode,
        "summary": art.summary,
        "partitions": [
            {"id": p.id, "name": p.name, "kind": p.kind, "module": p.module, "group": p.group, "device": p.device,
             "worker": p.worker, "units": p.units, "head": p.head_kind, **p.costs}
            for p in art.plan.partitions
        ],
    }


def print_summary(art: Artifact, title: str) -> None:
    """The rich table: one row per partition, a footer with the speed-ups."""
    s = art.summary
    table = Table(title=title, show_footer=False, header_style="bold")
    for col, just in (("partition", "left"), ("module", "right"), ("group", "right"), ("device", "left"),
                      ("layers", "left"), ("fwd MACs", "right"), ("bwd MACs", "right"), ("params", "right"),
                      ("in / sample", "right"), ("out / sample", "right")):
        table.add_column(col, justify=just)
    rows = art.plan.partitions
    shown = rows if len(rows) <= 40 else rows[:20] + rows[-20:]
    for i, p in enumerate(shown):
        if len(rows) > 40 and i == 20:
            table.add_row("...", "", "", "", f"({len(rows) - 40} more)", "", "", "", "", "")
        units = p.units if len(p.units) <= 3 else p.units[:1] + ["…"] + p.units[-1:]
        dev = p.device + (f" / w{p.worker}" if art.plan.workers > 1 else "")
        table.add_row(p.name, str(p.module), f"{p.group}/{p.groups}", dev, " ".join(units) or p.head_kind,
                      fmt_int(p.costs["fwd_macs"]), fmt_int(p.costs["bwd_macs"]), fmt_int(p.costs["params"]),
                      fmt_bytes(p.costs["bytes_in"]), fmt_bytes(p.costs["bytes_out"]))
    console.print(table)
    console.print(
        f"[bold]{s['partitions']}[/] partitions · K={art.plan.num_modules} · G={art.plan.groups if len(set(art.plan.groups)) > 1 else art.plan.groups[0]}"
        f" · end-to-end {fmt_int(s['e2e_macs'])} MACs · max partition {fmt_int(s['max_partition_macs'])} MACs · "
        f"inference {fmt_int(s['inference_macs'])} MACs\n"
        f"training speed-up [bold green]{s['training_speedup']:.2f}×[/] · inference speed-up "
        f"[bold green]{s['inference_speedup']:.2f}×[/] · params {fmt_int(s['params'])} "
        f"(inference {fmt_int(s['inference_params'])})", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the compile-side commands to ``app``."""

    @app.command("compile")
    def compile_(
        spec: Path = typer.Argument(..., help="Spec file (YAML)."),
        output: Path = typer.Option(Path("compiled"), "-o", "--output", help="Artifact directory."),
        workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Balance over N distributed workers."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Compile a spec into partitions, fx modules and an artifact directory."""
        art = compile_spec(spec, output, workers=workers)
        if as_json:
            print(json.dumps(summary_json(art), indent=1))
        else:
            print_summary(art, f"{art.plan.name} → {art.path}")
            console.print(f"wrote [bold]{art.path}/[/] (train it: gndgl train {art.path})", highlight=False)

    @app.command("inspect")
    def inspect(
        artifact: Path = typer.Argument(Path("compiled"), help="Artifact directory."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Summarise an existing compiled artifact (verifies its hashes)."""
        art = load_artifact(artifact)
        if as_json:
            print(json.dumps(summary_json(art), indent=1))
        else:
            m = art.manifest
            print_summary(art, f"{art.plan.name} ({artifact}, gndgl {m.get('gndgl')}, torch {m.get('torch')})")

    @app.command("schema")
    def schema() -> None:
        """Print the JSON Schema of the spec format (for editors)."""
        print(json.dumps(Spec.model_json_schema(), indent=1))
