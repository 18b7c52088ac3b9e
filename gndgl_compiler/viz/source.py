"""Where a picture's plan comes from: a compiled artifact, a run directory or a spec."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ArtifactError
from ..partition.plan import PartitionPlan

SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def load_plan(source: str | os.PathLike, *, workers: int | None = None) -> tuple[PartitionPlan, Path | None]:
    """The partition plan to draw.

    Args:
        source: an artifact directory (``compiled/``), a run directory of ``gndgl train``
            (uses its ``artifact/``) or a spec file (compiled in memory).
        workers: re-place the partitions over this many distributed workers.

    Returns:
        ``(plan, artifact_dir)``; ``artifact_dir`` is ``None`` for a spec.

    Raises:
        ArtifactError: the path does not exist or is not an artifact.
        SpecError: the spec is invalid.
    """
    from ..artifact import find_artifact, read_plan

    path = Path(source)
    if path.is_dir() and not (path / "plan.json").exists() and (path / "artifact" / "plan.json").exists():
        path = path / "artifact"
    path = find_artifact(path)
    if path.is_dir():
        if not (path / "plan.json").exists():
            raise ArtifactError(f"'{path}' is not a compiled artifact (no plan.json); compile a spec first "
                                f"(gndgl compile SPEC -o {path}) or draw the spec directly (gndgl viz SPEC)")
        plan = read_plan(path)
        if workers is not None:
            from ..partition.placement import place
            place(plan, plan.devices, workers)
        return plan, path
    if path.is_file():
        from ..api import compile_spec
        return compile_spec(path, workers=workers).plan, None
    hint = ("run `gndgl compile SPEC` first (it writes compiled/) or pass a spec: gndgl viz specs/NAME.yaml"
            if path.name == "compiled" else "give a compiled artifact directory, a run directory or a spec file")
    raise ArtifactError(f"'{path}' does not exist; {hint}")
