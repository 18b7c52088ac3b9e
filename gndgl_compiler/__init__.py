"""gndgl: a declarative graph compiler for local learning (Grouped Neuron DGL).

    spec ──▶ graph ──▶ partition ──▶ codegen ──▶ runtime

Python API (reference: docs/api.md)::

    from gndgl_compiler import load_spec, compile_spec, load_artifact, load_run
    from gndgl_compiler import TrainOptions, train_artifact, evaluate_run

The names are imported on first use (PEP 562), so ``import gndgl_compiler`` does not import
torch: ``gndgl --help``, ``schema`` and a spec's error messages answer without it; the training
runtime (data sets, executor, checkpoints) loads only when one of its names is asked for.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import GndglError, SpecError  # noqa: E402  (no third-party imports)
from .lazy import lazy_names  # noqa: E402

_LAZY = {"Artifact": ".api", "compile_spec": ".api", "load_artifact": ".api", "load_spec": ".spec",
         "load_run": ".runtime.evaluation.inference", "TrainOptions": ".runtime.run.options",
         "train_artifact": ".runtime.train",
         "evaluate_run": ".runtime.evaluation.evaluate"}
"""Public name → the module that defines it, imported when the name is first used."""

__all__ = ["Artifact", "GndglError", "SpecError", "TrainOptions", "__version__", "compile_spec", "evaluate_run",
           "load_artifact", "load_run", "load_spec", "train_artifact"]

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
