"""The runtime: the Trainer (``train.py``), its loop state and metrics, and one room per concern — ``step/`` (one
training step), ``fusion/`` (sibling fusion), ``data/``, ``checkpoint/``, ``dist/`` (distributed ranks), ``run/``
(options, run configuration, run directories) and ``evaluation/`` (docs/architecture.md, "The runtime in rooms")."""
