"""Counting the aten ops a piece of PyTorch code dispatches (forward, backward and optimizer alike).

On a GPU a small network's training step is bound by kernel launches, so the number of aten ops
per step predicts its speed there; counted on a CPU it is deterministic, unlike timings
(``benchmarks/step_cost.py``)::

    with OpCounter() as ops:
        ex.train_step(x, y, lr)
    print(ops.n)
"""

from __future__ import annotations

from typing import Any, Callable

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (``n``; ``by_name`` per op when ``names``)."""

    def __init__(self, names: bool = False):
        super().__init__()
        self.n = 0
        self.by_name: dict[str, int] | None = {} if names else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - dispatch signature
        self.n += 1
        if self.by_name is not None:
            key = str(func.overloadpacket)
            self.by_name[key] = self.by_name.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """The number of aten ops ``fn(*args, **kwargs)`` dispatches."""
    with OpCounter() as c:
        fn(*args, **kwargs)
    return c.n
