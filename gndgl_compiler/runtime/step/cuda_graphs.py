"""CUDA-graph capture of the whole training step (``train.cuda_graphs: auto|on|off``).

    step 0 .. W-1   eager, on a side stream (warm-up: cuDNN autotuning, momentum buffers, lazily
                    made tensors; these are real training steps)
    step W          batch copied into static buffers ─▶ ex.begin_step (host) ─▶ capture of
                    ex.run_step (forward, backward, optimizer with the device LR, stats) ─▶ replay
    step > W        x, y copied into the static buffers ─▶ ex.begin_step ─▶ replay

What makes the step capturable (checked on the CPU by ``tests/runtime/step/test_cuda_graphs.py``): it reads
no tensor on the host (no ``.item()`` / ``bool(tensor)`` / ``nonzero``); the LR is a 0-dim tensor
per device written before the replay (``runtime/step/lr.py``); dropout draws from
per-partition generators re-seeded before the replay and registered with the graph
(``runtime/step/streams.py``); every training batch has the same shape (the last partial batch of an
epoch is dropped, ``runtime/data/batches.py``); the metrics are summed on the device.

**UNTESTED ON A GPU.** This module was written on a machine without one. Until a session with a
GPU has run ``benchmarks/gpu_check_correctness.py`` (graphs on vs off: equal losses to float32
tolerance, and images/s), ``train.cuda_graphs`` defaults to ``off``. A capture that raises falls
back to the eager step with a note.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...errors import RunError

MODES = ("auto", "on", "off")
WARMUP_STEPS = 3


def not_capturable(devices: dict[int, torch.device], *, per_device_optim: bool, in_process: bool, world: int = 1,
                   sequential: bool = False, legacy_random: bool = False) -> str | None:
    """Why a training step of this process cannot be captured as one CUDA graph (None: it can).

    Args:
        devices: ``{pid: device}`` of the partitions this process owns.
        per_device_optim: one optimizer per device (the tensor-LR step needs it).
        in_process: the transport keeps every tensor in this process.
        world: number of processes of the run.
        sequential: module-by-module schedule (the trained set changes between phases).
        legacy_random: a random op that takes no generator (re-seeds the global RNG per step).
    """
    cpu = sorted({str(d) for d in devices.values() if d.type != "cuda"})
    if cpu:
        return f"partitions on {', '.join(cpu)} (CUDA graphs need every partition of the process on CUDA)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if world > 1 or not in_process:
        return "a distributed run (tensors cross processes inside the step)"
    if not per_device_optim:
        return "train.fused is false (the captured step needs the per-device updater)"
    if sequential:
        return "the sequential schedule (the trained partitions change between phases)"
    if legacy_random:
        return "a random op that takes no per-partition generator"
    return None


def resolve(mode: str, reason: str | None) -> bool:
    """Whether to capture: ``off`` no, ``auto`` when ``reason`` is None, ``on`` yes or RunError (exit 2).

    Raises:
        RunError: ``on`` in a configuration that cannot be captured, or an unknown mode.
    """
    if mode not in MODES:
        raise RunError(f"train.cuda_graphs must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return False
    if reason is None:
        return True
    if mode == "on":
        raise RunError(f"train.cuda_graphs: on, but the step cannot be captured: {reason}. Use "
                       "--cuda-graphs auto (captures when it can) or off")
    return False


Stats = dict[int, tuple[torch.Tensor, torch.Tensor | None]]


class GraphedStep:
    """A training step replayed from one CUDA graph (see the module docstring). Untested on a GPU.

    Args:
        ex: an Executor built with ``capturable=True``, every partition on CUDA.
        on_note: called with one line when the capture fails (the step then stays eager).
        warmup: eager steps on a side stream before the capture.
    """

    def __init__(self, ex: Any, on_note: Callable[[str], None] | None = None, warmup: int = WARMUP_STEPS):
        self.ex, self.on_note, self.warmup = ex, on_note, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.steps = 0
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.out: Stats = {}
        self.key: tuple | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, active: set[int] | None = None,
                 seed: tuple[int, int] | None = None) -> Stats:
        ex = self.ex
        key = (tuple(x.shape), x.dtype, x.stride(), tuple(y.shape), str(x.device), None if active is None
               else tuple(sorted(active)))
        if self.failed or (self.graph is not None and key != self.key):
            return ex.train_step(x, y, lr, active, seed)  # a shape the graph was not captured for: eager
        ex.begin_step(lr, active, seed)
        self.steps += 1
        if self.graph is None and self.steps <= self.warmup:
            return self._side_stream(x, y, lr, active, seed)
        if self.graph is None:
            try:
                self._capture(x, y, lr, active, seed, key)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the eager step
                self._fail(exc)
                ex.begin_step(lr, active, seed)
                return ex.run_step(x, y, lr, active, seed)
        sx, sy = self.static
        sx.copy_(x, non_blocking=True)
        sy.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.out

    def _side_stream(self, x, y, lr, active, seed) -> Stats:
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            out = self.ex.run_step(x, y, lr, active, seed)
        torch.cuda.current_stream(x.device).wait_stream(side)
        return out

    def _capture(self, x, y, lr, active, seed, key) -> None:
        ex = self.ex
        self.static = (x.clone(), y.clone())
        graph = torch.cuda.CUDAGraph()
        for gen in ex.streams.generators.values():
            graph.register_generator_state(gen)
        torch.cuda.synchronize(x.device)
        with torch.cuda.graph(graph):
            self.out = ex.run_step(self.static[0], self.static[1], lr, active, seed)
        self.graph, self.key = graph, key

    def _fail(self, exc: Exception) -> None:
        """Give up on the graph: drop what the capture left and train eagerly from now on."""
        self.failed, self.graph = True, None
        for opt in self.ex.optimizers.values():
            opt.zero_grad(set_to_none=True)
        fused = getattr(self.ex.updater, "fused_grads", None)
        if fused:
            torch._foreach_zero_(fused)
        if self.on_note:
            self.on_note(f"cuda graphs: the capture failed ({type(exc).__name__}: {exc}); training without them")
