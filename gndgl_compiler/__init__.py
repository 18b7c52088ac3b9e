"""gndgl: a declarative graph compiler for local learning (Grouped Neuron DGL).

    spec ──▶ graph ──▶ partition ──▶ codegen ──▶ runtime
"""

__version__ = "0.1.0"
