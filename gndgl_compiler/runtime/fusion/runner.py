"""The stage runner of a sibling-fused module: :class:`SiblingFusedRunner` (``runtime/step/runner.py``)."""

from __future__ import annotations

import torch

from typing import Any

from ..step.outputs import StageOutputs
from ..step.runner import StageEnv, StepState
from ..dist.transport import Transport
from .stage import FusedStage


class SiblingFusedRunner:
    """The stage runner of a sibling-fused module: forward and one backward of :class:`FusedStage`.

    Its output goes into the step's :class:`StageOutputs` whole (the next fused module reads it
    without a cat); its stats are reported directly. It trains the stage only when every sibling
    trains (sequential schedules fall back to the per-partition runner). Its G losses go to the
    updater's ``backward`` like a per-partition stage's (the per-device updater sums them: one
    backward through the fused program).

    Args:
        fs: the fused program.
        stage: the module's partition ids, in group order.
        module: the module's number (for error messages).
        env: the executor's shared state: the siblings' device, bf16 autocast, ``image01`` (InfoPro's
            reconstruction target) and the transport; unless the transport is ``in_process``, its hooks
            bring the module's inputs from other ranks and send each partition's output to its readers there.
    """

    def __init__(self, fs: FusedStage, stage: list[int], module: int, env: StageEnv):
        self.fs, self.stage, self.module, self.env = fs, stage, module, env
        self.device = env.devices[stage[0]]
        self.srcs = [i.source for i in fs.parts[0].inputs]

    @property
    def transport(self) -> Transport:
        """The executor's transport (held by its :class:`StageEnv`)."""
        return self.env.transport

    @property
    def remote(self) -> bool:
        """Whether tensors leave the process (else the hooks are skipped: they would do nothing)."""
        return not self.env.transport.in_process

    def takes(self, active: set[int] | None) -> bool:
        return active is None or all(p in active for p in self.stage)

    def train(self, st: StepState, updater: Any) -> None:
        fs, dev, h, env = self.fs, self.device, st.h, self.env
        assert isinstance(h, StageOutputs)
        if not fs.intact():
            raise RuntimeError(f"module {self.module}: a partition's parameters were moved or "
                               "replaced after the Executor fused them; build the Executor after moving modules")
        fs.attach_grads()
        self._recv_inputs(h)
        fused_in = h.get_fused(self.srcs) if fs.cat_input is not None else None
        inputs = [] if fused_in is not None else [h[s].to(dev, non_blocking=True) for s in self.srcs]
        yd = st.y.to(dev, non_blocking=True)
        image01 = env.image01(st.x).to(dev) if fs.loss.kind == "infopro" else None
        with env.autocast(dev):
            out, logits, losses, _total = fs.forward(inputs, fused_in, yd, image01)
        h.put_fused(self.stage, out, fs.widths)
        self._send_outputs(out)
        updater.backward(dict(zip(self.stage, losses.unbind(0))), st.lr)
        correct = [None] * fs.G if logits is None else (logits.detach().argmax(2) == yd.unsqueeze(1)).sum(0).unbind(0)
        st.stats.update(zip(self.stage, zip(losses.detach().unbind(0), correct)))

    # ---------------------------------------------------------------- transport hooks (distributed ranks)
    # Every sibling is on this rank (step_plan.py), so shares and diversity vectors stay here: only
    # the module's inputs arrive and its partitions' outputs leave, as on the per-partition path.
    def _recv_inputs(self, h: StageOutputs) -> None:
        """Receive into ``h`` the module's inputs that live on other ranks."""
        if self.remote:
            for pid in self.stage:
                self.transport.recv_inputs(pid, h)

    def _send_outputs(self, out: torch.Tensor) -> None:
        """Send each partition's output (its channel slice of ``out``, detached; the transport makes
        it contiguous) to its readers on other ranks."""
        if self.remote:
            start = 0
            for width, pid in zip(self.fs.widths, self.stage):
                self.transport.send_output(pid, out.detach().narrow(1, start, width))
                start += width
