"""The learning rate as a 0-dim tensor on each device, for a step that reads nothing on the host.

A CUDA graph replays the kernels it captured with the arguments it captured, so a Python-float
LR would be frozen into the graph. Here each device keeps one 0-dim LR tensor; the host writes
the step's value into it with ``fill_`` *before* the step (an asynchronous kernel launch, not a
synchronisation) and every param group of that device holds the tensor itself as its ``lr``.

torch's SGD turns a tensor LR into a host scalar (``alpha=-lr`` calls ``.item()``, a sync), so
:func:`sgd_step` is the same SGD math (weight decay, momentum, dampening, Nesterov, maximize) in
foreach ops that read the LR on the device: ``p += g · (−lr)``. That last product and sum are two
roundings where torch's ``add_(g, alpha=−lr)`` may be one (FMA), so this path equals the float
path to float rounding, not bit for bit: it is used only when the step is CUDA-graph captured
(``train.cuda_graphs``); the default path keeps the Python float and today's exact results.
Adam / AdamW take a tensor LR themselves with ``capturable=True`` (CUDA only).
"""

from __future__ import annotations

import torch


class DeviceLR:
    """One 0-dim LR tensor per device, installed as ``lr`` of every param group of that device's optimizer.

    Args:
        optimizers: ``{device string: optimizer}`` (one per device, a param group per partition).
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.tensors: dict[str, torch.Tensor] = {}
        for key, opt in optimizers.items():
            p0 = opt.param_groups[0]["params"][0]
            lr = opt.param_groups[0]["lr"]
            self.tensors[key] = torch.full((), float(lr), dtype=p0.dtype if p0.is_floating_point() else torch.float32,
                                           device=p0.device)
        self.optimizers = optimizers
        self.install()

    def install(self) -> None:
        """Point every param group's ``lr`` at its device's tensor (again after ``load_state_dict``)."""
        for key, opt in self.optimizers.items():
            for g in opt.param_groups:
                g["lr"] = self.tensors[key]

    def set(self, lr: float) -> None:
        """Write the step's LR into every device's tensor (host → device, no synchronisation)."""
        for t in self.tensors.values():
            t.fill_(lr)


def plain_groups(state: dict) -> dict:
    """An optimizer ``state_dict`` with tensor LRs as floats (the checkpoint format; read outside a step)."""
    groups = [{**g, "lr": float(g["lr"])} if isinstance(g.get("lr"), torch.Tensor) else g
              for g in state["param_groups"]]
    return {**state, "param_groups": groups}


@torch.no_grad()
def sgd_step(opt: torch.optim.SGD) -> None:
    """One SGD step of ``opt`` reading each group's tensor ``lr`` on the device (no host scalar).

    Param groups with the same hyper-parameters and LR tensor are stepped by one set of foreach
    calls; the momentum buffers live in ``opt.state[p]["momentum_buffer"]`` as torch keeps them.
    """
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for g in opt.param_groups:
        key = (id(g["lr"]), g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"], g["maximize"])
        params = buckets.setdefault(key, [])
        params += [p for p in g["params"] if p.grad is not None]
        buckets[key] = params
    lrs = {id(g["lr"]): g["lr"] for g in opt.param_groups}
    for (lr_id, momentum, dampening, wd, nesterov, maximize), params in buckets.items():
        if not params:
            continue
        grads = [p.grad for p in params]
        if maximize:
            grads = torch._foreach_neg(grads)
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if momentum != 0:
            bufs, old, old_grads = [], [], []
            for p, grad in zip(params, grads):
                buf = opt.state[p].get("momentum_buffer")
                if buf is None:
                    buf = torch.clone(grad).detach()
                    opt.state[p]["momentum_buffer"] = buf
                else:
                    old.append(buf)
                    old_grads.append(grad)
                bufs.append(buf)
            if old:
                torch._foreach_mul_(old, momentum)
                torch._foreach_add_(old, old_grads, alpha=1 - dampening)
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
        torch._foreach_add_(params, torch._foreach_mul(grads, torch.neg(lrs[lr_id])))
