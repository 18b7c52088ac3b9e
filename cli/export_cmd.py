"""``gndgl export``: a trained run as a TorchScript, torch.export, ONNX or safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, newest_run_noted


def register(app: typer.Typer) -> None:
    """Add ``export`` to ``app``."""

    @app.command("export")
    def export(
        run: Optional[Path] = typer.Argument(None, metavar="[RUN]",
                                             help="Run directory made by 'gndgl train'; default: the newest "
                                                  "in ./runs."),
        output: Path = typer.Option(..., "-o", "--output", metavar="FILE",
                                    help="File to write (.pt, .pt2, .onnx or .safetensors)."),
        fmt: Optional[str] = typer.Option(None, "--format", "-f", metavar="FORMAT",
                                          help="torchscript | export | onnx | safetensors (default: from the "
                                               "suffix of FILE)."),
        partition: Optional[str] = typer.Option(None, "--partition", "-p", metavar="NAME",
                                                help="Export one partition with its aux head (an early exit) "
                                                     "instead of the whole network."),
    ) -> None:
        """Export a trained run: images in [0, 1] → logits, normalisation built in (safetensors: weights only)."""
        from gndgl_compiler.export import export_run, resolve_format

        kind = resolve_format(output, fmt)  # fail on a bad format before loading anything
        run = run if run is not None else newest_run_noted("weights")
        path = export_run(run, output, kind, partition=partition)
        what = f"partition {partition}" if partition else "network"
        console.print(f"wrote {path} ({kind}, {what} of {run}, {path.stat().st_size / 1e6:.2f} MB)",
                      highlight=False, markup=False, soft_wrap=True)
