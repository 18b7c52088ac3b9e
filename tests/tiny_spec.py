"""The small GN-DGL network the training tests share.

K=2 (cut before ``block1``) × G=2 with stop-gradient sharing (r=1), the diversity penalty and a
separate 1c2f final head: 5 partitions, on the 3×32×32 ``synthetic`` data set. Each test module
adds its own ``train:`` section.
"""

from __future__ import annotations


ONE_EPOCH = """train:
  dataset: synthetic
  batch_size: 16
  epochs: 1
  augment: null
  log_every: 2
"""
"""A ``train:`` section: one epoch of the synthetic data set in batches of 16, no augmentation, a log record every
2 steps (the CLI tests limit the epoch with ``--limit-train``)."""


def tiny_spec(name: str, train: str, *, num_classes: int | str = 10, deep: bool = True,
              schedule: str = "parallel") -> str:
    """YAML text of the tiny spec.

    Args:
        name: the spec's ``name``.
        train: the ``train:`` section (YAML, starting with ``train:``).
        num_classes: classes (a string keeps a placeholder for the caller to replace).
        deep: add a third residual block (16 channels) to the second module.
        schedule: the local-learning schedule (``parallel`` | ``sequential`` or a placeholder).

    Returns:
        The spec as YAML text.
    """
    block3 = "    - {op: block, name: block3, out: 16}\n" if deep else ""
    return f"""name: {name}
model:
  input_shape: [3, 32, 32]
  num_classes: {num_classes}
  layers:
    - {{op: conv, name: conv1, out: 8, stride: 2}}
    - {{op: bn}}
    - {{op: relu}}
    - {{op: block, name: block1, out: 8}}
    - {{op: block, name: block2, out: 16, stride: 2}}
{block3}    - {{op: adaptive_avgpool, size: 1}}
    - {{op: flatten}}
    - {{op: linear, name: fc, out: {num_classes}}}
cuts: {{depth: [block1], width: 2}}
local:
  head: {{kind: 1c2f, hidden: 32}}
  share_ratio: 1.0
  diversity: {{weight: 0.5, temperature: 3.0}}
  final_head: {{kind: 1c2f, mode: separate, hidden: 32}}
  schedule: {schedule}
{train.strip()}
"""
