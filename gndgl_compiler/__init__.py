"""gndgl: a declarative graph compiler for local learning (Grouped Neuron DGL).

    spec ──▶ graph ──▶ partition ──▶ codegen ──▶ runtime

Python API::

    from gndgl_compiler import load_spec, compile_spec, load_artifact, load_run
"""

__version__ = "0.1.0"

from .api import Artifact, compile_spec, load_artifact  # noqa: E402
from .errors import GndglError, SpecError  # noqa: E402
from .spec import load_spec  # noqa: E402
from .runtime.inference import load_run  # noqa: E402

__all__ = ["Artifact", "GndglError", "SpecError", "__version__", "compile_spec", "load_artifact", "load_run", "load_spec"]
