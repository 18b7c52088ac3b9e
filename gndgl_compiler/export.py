"""``export_run``: a trained run as a file other programs load (``gndgl export``).

=============  ========  ====================================================================
format         suffix    what the file holds / how to load it
=============  ========  ====================================================================
torchscript    ``.pt``   traced TorchScript: ``torch.jit.load(f)(images)``
export         ``.pt2``  a ``torch.export`` program: ``torch.export.load(f).module()(images)``
onnx           ``.onnx`` ONNX (needs ``pip install "gndgl[export]"``), e.g. onnxruntime
safetensors    ``.safetensors``  the weights with the names of ``Artifact.assembled()``
                         (``load_state_dict(..., strict=True)``); mean/std/classes in its metadata
=============  ========  ====================================================================

The program formats take float images N×C×H×W in [0, 1] (any batch size) and normalise them
inside, as :func:`~gndgl_compiler.runtime.evaluation.inference.load_run` does; they return logits. The
safetensors file holds weights only: feed ``assembled()`` ``(x - mean) / std``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__, fsio
from .errors import GndglError
from .runtime.evaluation.inference import TrainedNet, load_run

FORMATS = {"torchscript": ".pt", "export": ".pt2", "onnx": ".onnx", "safetensors": ".safetensors"}
"""Export formats and their usual file suffixes (a suffix alone chooses the format)."""
ONNX_HINT = 'pip install "gndgl[export]"'
SAFETENSORS_FORMAT = "gndgl-assembled"


class ExportError(GndglError):
    """An export cannot be written as asked: format, output path, partition, missing package (exit 2)."""


class ExportFailed(ExportError):
    """A converter (ONNX) failed on a valid request (exit 1)."""

    exit_code = 1


def resolve_format(output: str | os.PathLike, fmt: str | None) -> str:
    """The export format: ``fmt`` if given, else the one ``output``'s suffix names.

    Raises:
        ExportError: an unknown format, or no format and a suffix that names none (lists the valid ones).
    """
    valid = ", ".join(f"{k} ({v})" for k, v in FORMATS.items())
    if fmt is not None:
        key = fmt.strip().lower()
        if key not in FORMATS:
            raise ExportError(f"unknown export format '{fmt}'; choose one of {valid}")
        return key
    suffix = Path(output).suffix.lower()
    for key, suf in FORMATS.items():
        if suffix == suf:
            return key
    raise ExportError(f"cannot tell the format from '{output}'; pass --format (one of {valid}) or use one of "
                      "those suffixes")


RUN_FILES = ("weights.safetensors", "run.json", "data.json", "summary.json", "metrics.jsonl", "metrics.csv")
"""Files of a run directory that an export must not replace (besides ``artifact/`` and ``checkpoints/``)."""


def _check_output(output: Path, run_dir: Path) -> None:
    """Refuse an output that is a directory or one of the run's own files; create its folder.

    Raises:
        ExportError: naming the problem and another ``-o`` to use.
    """
    if output.is_dir():
        raise ExportError(f"'{output}' is a directory; give a file name, e.g. -o {output / 'model.pt2'}")
    target = output.resolve()
    if target in [(run_dir / name).resolve() for name in RUN_FILES]:
        raise ExportError(f"'{output}' is a file of the run itself and would be replaced; write the export "
                          f"elsewhere, e.g. -o {run_dir / ('model' + output.suffix)}")
    for managed in ("artifact", "checkpoints"):
        folder = (run_dir / managed).resolve()
        if target == folder or folder in target.parents:
            raise ExportError(f"'{output}' is inside the run's {managed}/ folder, which gndgl manages; write the "
                              f"export elsewhere, e.g. -o {run_dir / ('model' + output.suffix)}")
    parent = output.parent if str(output.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create the folder '{parent}' for '{output}': {exc.strerror}; choose another "
                          "-o") from None
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write to '{parent}' (permission denied); choose another -o")


def _require_onnx() -> None:
    """Raise ExportError saying what to install when onnx or onnxscript cannot be imported."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the 'onnx' and 'onnxscript' packages ({exc}); install them with: "
                          f"{ONNX_HINT}") from None


def _example(net: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """A float [0, 1] example batch of 2 (a batch of 1 would fix the batch size), on ``net``'s device."""
    device = next(net.parameters()).device
    return torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)


def _write(net: nn.Module, example: torch.Tensor, fmt: str, path: Path, meta: dict[str, str]) -> None:
    """Write ``net`` as ``fmt`` to ``path`` (a temp name that :func:`gndgl_compiler.fsio.atomic_write_via` renames)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter; the result is checked by the tests
        if fmt == "torchscript":
            traced = torch.jit.trace(net, (example,), check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={"gndgl.json": json.dumps(meta)})
        elif fmt == "export":
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(net, (example,), dynamic_shapes={"images": {0: batch}})
            torch.export.save(program, str(path), extra_files={"gndgl.json": json.dumps(meta)})
        elif fmt == "onnx":
            try:
                onnx_program = torch.onnx.export(net, (example,), dynamo=True, input_names=["images"],
                                                 output_names=["logits"], dynamic_shapes={"images": {0: "batch"}},
                                                 external_data=False, verbose=False)
            except Exception as exc:  # noqa: BLE001 - the converter raises many types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ExportFailed(f"the ONNX converter failed ({first}); update it ({ONNX_HINT} -U) or "
                                   "export with --format export") from None
            onnx_program.save(str(path))
        else:  # safetensors: the assembled network's weights, by their assembled() names
            from safetensors.torch import save_file
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
            save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})


def export_run(run: str | os.PathLike | TrainedNet | None, output: str | os.PathLike, fmt: str | None = None,
               partition: str | None = None) -> Path:
    """Export a trained run (or one partition with its aux head) to a file.

    Args:
        run: a run directory (default: the newest in ``./runs``) or a loaded :class:`TrainedNet`.
        output: the file to write (replaced atomically if it exists).
        fmt: ``torchscript`` | ``export`` | ``onnx`` | ``safetensors``; default: from the suffix of ``output``.
        partition: export ``load_run(run).partition(partition)`` instead of the whole network
            (program formats only).

    Returns:
        The written path.

    Raises:
        ExportError: unknown format, a bad output path, safetensors with a partition, onnx not installed.
        RunError: not a run directory, no weights, an unknown partition (lists the valid names).
    """
    output = Path(output)
    fmt = resolve_format(output, fmt)
    if fmt == "onnx":
        _require_onnx()
    if partition is not None and fmt == "safetensors":
        raise ExportError("--partition exports a program (torchscript, export or onnx); the safetensors export "
                          "holds the weights of the whole network, by the names of assembled()")
    net = run if isinstance(run, TrainedNet) else load_run(run)
    _check_output(output, net.run_dir)
    module: nn.Module = net.partition(partition) if partition is not None else net
    meta = {"format": SAFETENSORS_FORMAT if fmt == "safetensors" else f"gndgl-{fmt}", "gndgl": __version__,
            "name": net.artifact.plan.name, "partition": partition or "", "mean": json.dumps(net.mean),
            "std": json.dumps(net.std), "classes": json.dumps(net.classes), "input_shape": json.dumps(net.input_shape),
            "input": "float images N×C×H×W in [0, 1]" if fmt != "safetensors" else "(x - mean) / std",
            "weights": net.source}
    target: nn.Module = net.net if fmt == "safetensors" else module
    was_training = module.training
    module.eval()  # BatchNorm with its running statistics, whatever the caller did with the net
    try:
        example = _example(module, net.input_shape)
        # a hidden sibling with the format's own suffix (torch.export.save wants .pt2), fsynced and renamed over
        # output when complete, with the mode a plain open() would give (safetensors writes 0600)
        fsio.atomic_write_via(output, lambda tmp: _write(target, example, fmt, tmp, meta), suffix=FORMATS[fmt],
                              error=None)
    except OSError as exc:
        raise ExportError(f"cannot write '{output}': {exc.strerror or exc}; choose another -o") from None
    finally:
        module.train(was_training)
    return output


__all__ = ["FORMATS", "ExportError", "ExportFailed", "export_run", "resolve_format"]
