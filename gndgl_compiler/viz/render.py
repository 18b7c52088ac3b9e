"""Turn DOT text into SVG / PNG / PDF with graphviz's ``dot`` (subprocess, with a timeout)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .. import fsio
from ..errors import GndglError

FORMATS = ("svg", "png", "pdf", "dot")
INSTALL_HINT = ("install graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz; "
                "conda: conda install graphviz)")


class RenderError(GndglError):
    """Graphviz is missing, failed or took too long (the DOT source is still written)."""


def output_format(output: str | os.PathLike | None, fmt: str | None) -> str:
    """The format to write: ``fmt`` if given, else the suffix of ``output``, else svg.

    Raises:
        RenderError: an unknown format or suffix.
    """
    if fmt is not None:
        fmt = fmt.lower().lstrip(".")
        if fmt not in FORMATS:
            raise RenderError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")
        return fmt
    if output is None:
        return "svg"
    suffix = Path(output).suffix.lower().lstrip(".")
    if suffix in FORMATS or suffix == "gv":
        return "dot" if suffix == "gv" else suffix
    raise RenderError(f"cannot tell the format of '{output}' from its suffix; name it .svg, .png, .pdf or .dot, "
                      "or pass --format")


def _atomic_write(path: Path, data: bytes) -> None:
    """``data`` to ``path`` atomically (parents created); OSError on failure (the caller names the file)."""
    fsio.current().mkdir(path.parent, parents=True, exist_ok=True)
    fsio.atomic_write_bytes(path, data, error=None)


def render_dot(dot_text: str, output: str | os.PathLike, fmt: str | None = None, *, timeout: float = 120.0) -> Path:
    """Write ``dot_text`` as ``output`` in ``fmt`` (svg, png, pdf or dot).

    Args:
        dot_text: DOT source.
        output: the file to write (parent directories are created).
        fmt: output format; default from the suffix of ``output``.
        timeout: seconds graphviz may take.

    Returns:
        The path written.

    Raises:
        RenderError: ``dot`` is not installed, fails or times out; the DOT source is
            then written next to ``output`` (``.dot``) and the message says where.
    """
    out = Path(output)
    fmt = output_format(out, fmt)
    try:
        if fmt == "dot":
            _atomic_write(out, dot_text.encode("utf-8"))
            return out
        exe = shutil.which("dot")
        if exe is None:
            src = _keep_source(dot_text, out)
            raise RenderError(f"graphviz's `dot` program was not found, so no {fmt} was drawn; {INSTALL_HINT}. "
                              f"The DOT source is in {src} (render it later with: dot -T{fmt} {src} -o {out})")
        try:
            proc = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode("utf-8"), capture_output=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            src = _keep_source(dot_text, out)
            raise RenderError(f"graphviz took longer than {timeout:g}s to lay out the graph; try --level partitions "
                              f"or a longer --timeout. The DOT source is in {src}") from None
        if proc.returncode != 0 or not proc.stdout:
            src = _keep_source(dot_text, out)
            err = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
            why = " / ".join(err) or "no output"
            raise RenderError(f"graphviz failed to draw {out} (exit {proc.returncode}: {why}); "
                              f"the DOT source is in {src}")
        _atomic_write(out, proc.stdout)
    except OSError as exc:
        raise RenderError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def _keep_source(dot_text: str, out: Path) -> Path:
    src = out.with_suffix(".dot")
    _atomic_write(src, dot_text.encode("utf-8"))
    return src
