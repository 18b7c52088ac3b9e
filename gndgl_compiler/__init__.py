"""gndgl: a declarative graph compiler for local learning (Grouped Neuron DGL).

    spec ──▶ graph ──▶ partition ──▶ codegen ──▶ runtime

Python API (reference: docs/api.md)::

    from gndgl_compiler import load_spec, compile_spec, load_artifact, load_run
    from gndgl_compiler import TrainOptions, train_artifact, evaluate_run
"""

__version__ = "0.1.0"

from .api import Artifact, compile_spec, load_artifact  # noqa: E402
from .errors import GndglError, SpecError  # noqa: E402
from .spec import load_spec  # noqa: E402
from .runtime.inference import load_run  # noqa: E402

_LAZY = {"TrainOptions": "runtime.options", "train_artifact": "runtime.train", "evaluate_run": "runtime.evaluate"}
"""Names imported on first use: the training runtime (data sets, executor, checkpoints) loads only when asked for."""


def __getattr__(name: str):
    """``from gndgl_compiler import train_artifact`` imports the training runtime then (PEP 562)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Artifact", "GndglError", "SpecError", "TrainOptions", "__version__", "compile_spec", "evaluate_run",
           "load_artifact", "load_run", "load_spec", "train_artifact"]
