"""What ``gndgl train`` does before training: refuse the bad input it can see, and compile a spec on
the fly so that a start which then fails on bad input leaves no artifact behind."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator

from .common import console
from .compile_cmd import default_output, print_final_head


def is_spec(source: Path) -> bool:
    """Whether ``gndgl train SOURCE`` compiles ``source`` (a spec file) rather than loading an artifact."""
    return source.is_file() or source.suffix in (".yaml", ".yml")


@contextlib.contextmanager
def compiled_on_the_fly(source: Path, opts: Any) -> Iterator[Any]:
    """Compile the spec ``source`` to ``compiled/<name>/`` for a new run and yield the artifact.

    The spec's data set, ``--data-root``, ``--device`` and ``--run-dir`` are checked first (a bad one
    compiles nothing). If the block then fails on bad input (exit status 2: a data set that cannot be
    read, a ``--workers`` rank that refused its input), the compile is undone as the run directory is:
    an artifact this command created is removed, one it replaced is put back.

    Raises:
        GndglError: the spec or an option is bad (nothing written), or what the block raised.
    """
    from gndgl_compiler.errors import GndglError
    from gndgl_compiler.spec import load_spec

    spec = load_spec(source, overrides=opts.overrides)  # a bad spec is reported before torch is imported
    from gndgl_compiler import compile_spec
    from gndgl_compiler.runtime.run.preflight import check_spec_run

    check_spec_run(spec.model_dump(mode="json")["train"], opts)
    out = default_output(source)
    kept = _keep_copy(out)
    try:
        with console.status(f"compiling {source} → {out}/"):
            art = compile_spec(spec, out)
        console.print(f"compiled {source} → {out}/", highlight=False, markup=False)
        print_final_head(art)
        yield art
    except GndglError as err:
        if err.exit_code == 2:
            _undo(out, kept)
        raise
    finally:
        if kept is not None:
            from gndgl_compiler import fsio

            fsio.current().rmtree(kept)


def _keep_copy(out: Path) -> Path | None:
    """A copy of the artifact in ``out`` beside it (``.<name>.prev-*/a``), or None if there is none."""
    from gndgl_compiler import fsio
    from gndgl_compiler.artifact import MANIFEST

    if not (out / MANIFEST).is_file():
        return None
    kept = fsio.current().mkdtemp(out.parent, f".{out.name}.prev-")
    shutil.copytree(out, kept / "a")
    return kept


def _undo(out: Path, kept: Path | None) -> None:
    """Put back the artifact ``kept`` (atomically), or remove the one this command created."""
    from gndgl_compiler import fsio
    from gndgl_compiler.errors import ArtifactError

    if kept is None:
        fsio.current().rmtree(out)
        return
    with fsio.replacing_dir(out, error=ArtifactError, what="artifact") as tmp:
        shutil.copytree(kept / "a", tmp, dirs_exist_ok=True)
