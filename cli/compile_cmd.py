"""``gndgl compile``, ``gndgl inspect`` and ``gndgl schema``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from gndgl_compiler.errors import GndglError

if TYPE_CHECKING:  # torch is imported by the commands that need it, not by 'gndgl --help'
    from gndgl_compiler.api import Artifact

from .common import console, console_err, fmt_bytes, fmt_int, note_resolved


def summary_json(art: Artifact) -> dict:
    """Machine-readable summary of an artifact (what ``--json`` prints)."""
    return {
        "name": art.plan.name,
        "path": str(art.path) if art.path else None,
        "modules": art.plan.num_modules,
        "groups": art.plan.groups,
        "final_mode": art.plan.final_mode,
        "summary": art.summary,
        "final_head": art.final_head,
        "warnings": art.final_head["warnings"],
        "partitions": [
            {"id": p.id, "name": p.name, "kind": p.kind, "module": p.module, "group": p.group, "device": p.device,
             "worker": p.worker, "units": p.units, "head": p.head_kind, **p.costs,
             **({"aux_units": p.aux_units} if p.aux_units else {})}
            for p in art.plan.partitions
        ],
    }


def print_summary(art: Artifact, title: str) -> None:
    """The partition table (fits 80 columns: pipes, logs) and a footer with the speed-ups."""
    s, plan = art.summary, art.plan
    devices = sorted({p.device for p in plan.partitions})
    one_device = len(devices) == 1 and plan.workers <= 1
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True,
                  header_style="bold",
                  title_justify="left")
    one_type = len(devices) == 1
    place_col = [] if one_device else [("worker" if one_type else "device", "left")]
    cols = [("partition", "left")] + place_col  # the name says module and group: m<k>.g<g>
    cols += [("layers", "left"), ("fwd\nMACs", "right"), ("bwd\nMACs", "right"), ("params", "right"),
             ("in\n/img", "right"), ("out\n/img", "right"), ("act\n/img", "right")]
    for col, just in cols:
        table.add_column(col, justify=just, no_wrap=True, overflow="ellipsis")
    rows = plan.partitions
    shown = rows if len(rows) <= 40 else rows[:20] + rows[-20:]
    for i, p in enumerate(shown):
        if len(rows) > 40 and i == 20:
            table.add_row("...", *([] if one_device else [""]), f"({len(rows) - 40} more)", "", "", "", "", "", "")
        units = (p.units[0] if len(p.units) == 1 else f"{p.units[0]}..{p.units[-1]}") if p.units else p.head_kind
        dev = [] if one_device else [f"w{p.worker}" if one_type
                                     else p.device + (f"/w{p.worker}" if plan.workers > 1 else "")]
        table.add_row(p.name, *dev, units,
                      fmt_int(p.costs["fwd_macs"]), fmt_int(p.costs["bwd_macs"]), fmt_int(p.costs["params"]),
                      fmt_bytes(p.costs["bytes_in"]), fmt_bytes(p.costs["bytes_out"]),
                      fmt_bytes(p.costs.get("act_bytes", 0)))
    console.print(table)
    g = plan.groups if len(set(plan.groups)) > 1 else plan.groups[0]
    where = f" · all on {devices[0]}" if one_type else ""
    console.print(
        f"[bold]{s['partitions']}[/] partitions · K={plan.num_modules} · G={g}{where}\n"
        f"MACs per image: end-to-end {fmt_int(s['e2e_macs'])} · max partition {fmt_int(s['max_partition_macs'])}"
        f" · inference {fmt_int(s['inference_macs'])}\n"
        f"training speed-up [bold green]{s['training_speedup']:.2f}×[/] · inference speed-up "
        f"[bold green]{s['inference_speedup']:.2f}×[/]\n"
        f"params {fmt_int(s['params'])} (inference {fmt_int(s['inference_params'])})", highlight=False)
    if "memory" in s:
        console.print(memory_line(s["memory"]), highlight=False)
    if "weight_bytes_per_step" in s:
        n = sum(e.kind == "weight" for e in plan.edges)
        console.print(f"MAN: {n} weight edges (U's parameters → the EMA unit of the module before, no gradient), "
                      f"{fmt_bytes(s['weight_bytes_per_step'])} per step; aux-net MACs and parameters are in the "
                      "table", highlight=False, soft_wrap=True)
    for line in aux_unit_lines(plan):
        console.print(line, highlight=False, soft_wrap=True)


def aux_unit_lines(plan) -> list[str]:
    """auglocal: which later units each partition's aux net was built from (siblings of a module on one line)."""
    mods = [ps for ps in plan.by_module().values() if any(p.aux_units for p in ps)]
    if not mods:
        return []
    lines = ["auglocal aux nets (fresh units of the kinds and widths of):"]
    for ps in mods:
        name = ps[0].name if len(ps) == 1 else f"{ps[0].name}..g{ps[-1].group}"
        lines.append(f"  {name} ← {', '.join(ps[0].aux_units)}")
    return lines


def memory_line(mem: dict) -> str:
    """The memory model's footer: activations per image and the predicted step peak per device (DESIGN §4.1)."""
    peaks = " · ".join(f"{dev} {fmt_bytes(d['peak_bytes'])}" for dev, d in mem["devices"].items())
    return (f"memory: activations per image: max partition {fmt_bytes(mem['max_act_bytes'])}, end-to-end "
            f"{fmt_bytes(mem['e2e_act_bytes'])}\n        predicted step peak at batch {mem['batch_size']}: {peaks}")


def print_final_head(art: Artifact, notes: bool = True) -> None:
    """Say what the final head replaced (a note) and warn when inference is slower than the model itself."""
    report = art.final_head
    for note in report["notes"] if notes else []:
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    for warning in report["warnings"]:
        console_err.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


def default_output(spec: Path) -> Path:
    """Where ``gndgl compile SPEC`` (and ``gndgl train SPEC``) writes: ``compiled/<file name>/``."""
    return Path("compiled") / spec.stem


def compile_command(
    spec: Path = typer.Argument(..., help="Spec file (YAML)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="DIR",
                                          help="Artifact directory (default: compiled/<spec file name>)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Balance over N distributed workers."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    sets: Optional[list[str]] = typer.Option(None, "--set", metavar="FIELD=VALUE",
                                             help="Set any spec field (repeatable), e.g. --set cuts.width=2."),
) -> None:
    """Compile a spec into partitions, fx modules and an artifact directory."""
    from gndgl_compiler.spec import load_spec

    loaded = load_spec(spec, overrides=sets or None)  # a bad spec is reported before torch is imported
    from gndgl_compiler import compile_spec

    with contextlib.nullcontext() if as_json else console.status(f"compiling {spec}"):
        art = compile_spec(loaded, output if output is not None else default_output(spec), workers=workers)
    if as_json:
        print(json.dumps(summary_json(art), indent=1))
        print_final_head(art, notes=False)
    else:
        print_summary(art, f"{art.plan.name} → {art.path}")
        print_final_head(art)
        console.print(f"wrote [bold]{art.path}/[/] (train it: gndgl train {art.path})", highlight=False)


def inspect_command(
    artifact: Path = typer.Argument(Path("compiled"), help="Artifact directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarise an existing compiled artifact (verifies its hashes)."""
    from gndgl_compiler import load_artifact

    art = load_artifact(artifact)
    note_resolved(artifact, art.path)
    if as_json:
        print(json.dumps(summary_json(art), indent=1))
    else:
        m = art.manifest
        print_summary(art, f"{art.plan.name} ({art.path}, gndgl {m.get('gndgl')}, torch {m.get('torch')})")
        console.print(f"all {len(m.get('files', {}))} files match the sha256 hashes in manifest.json",
                      highlight=False)


def units_command(
    source: str = typer.Argument(..., metavar="TEMPLATE|SPEC",
                                 help="A template (resnet20, resnet32, resnet56, resnet110, vgg6a) or a spec "
                                      "file."),
    width: float = typer.Option(1.0, "--width", help="Template width multiplier."),
) -> None:
    """List the segments of a network: the names and indices to write depth cuts with."""
    from gndgl_compiler import load_spec
    from gndgl_compiler.graph.build import build_graph
    from gndgl_compiler.spec.models import Model

    templates = Model.model_fields["template"].annotation.__args__[0].__args__
    if source in templates:
        spec = load_spec({"name": source, "model": {"template": source, "width": width}})
    elif Path(source).suffix in (".yaml", ".yml") or Path(source).exists():
        spec = load_spec(source)
    else:
        raise GndglError(f"'{source}' is neither a template ({', '.join(templates)}) nor a spec file")
    console.print(segments_table(spec.name, build_graph(spec)))


def schema_command() -> None:
    """Print the JSON Schema of the spec format (for editors)."""
    from gndgl_compiler.spec.models import Spec

    print(json.dumps(Spec.model_json_schema(), indent=1))


def segments_table(name: str, og: Any) -> Table:
    """The segments of network ``name`` (its op graph ``og``) as a table: index, name, units, output shape, MACs,
    parameters."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True, header_style="bold",
                  title=f"{name}: {len(og.segments)} segments; cut before any but the first, by name or "
                        "index: cuts: {depth: [NAME, INDEX, ...]}", title_justify="left")
    for col, just in (("index", "right"), ("name", "left"), ("units", "left"), ("output", "left"),
                      ("MACs", "right"), ("params", "right")):
        table.add_column(col, justify=just, no_wrap=True, overflow="ellipsis")
    for seg in og.segments:
        nodes = [og.graph.nodes[n] for n in seg.nodes]
        shape = "×".join(map(str, og.graph.nodes[seg.output]["shape"]))
        table.add_row(str(seg.index), seg.name, " ".join(seg.units), shape,
                      fmt_int(sum(d["macs"] for d in nodes)), fmt_int(sum(d["params"] for d in nodes)))
    return table


def register(app: typer.Typer) -> None:
    """Add the compile-side commands to ``app``."""
    app.command("compile")(compile_command)
    app.command("inspect")(inspect_command)
    app.command("units")(units_command)
    app.command("schema")(schema_command)
