"""Fused parameter storage: per-partition parameters become views of one tensor per sibling slot.

For a layer present in all G sibling partitions of a module (same IR node name), the G
parameters are concatenated along their output dimension into one *fused* leaf tensor, and
each partition's ``nn.Parameter`` (or buffer) is re-pointed at its slice of that storage:

    fused W  [G·O, I, k, k]   ── rows g·O .. (g+1)·O ──▶  partition g's weight (same object, new storage)
    fused W.grad              ── same rows            ──▶  partition g's .grad (a view, attached per step)

The partitions keep their parameter objects, names and shapes, so ``state_dict``,
checkpoints, ``weights.safetensors`` and the per-partition optimizer state are unchanged;
an in-place write through either side (optimizer step, ``load_state_dict``, BatchNorm's
running-stat update) is seen by the other. Linear weights are stacked as ``[G, O, I]`` so the
fused program runs the G layers as one batched matmul.

Moving a module to another device or dtype after fusion (``module.to``) replaces its
storage and breaks the alias; :meth:`FusedTensor.intact` detects that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FusedTensor:
    """One fused leaf tensor and the per-partition tensors that alias its slices.

    Attributes:
        fused: the fused tensor (a leaf with ``requires_grad`` for parameters).
        parts: the per-partition parameters / buffers, in group order.
        linear: True when ``fused`` is a linear weight stacked as ``[G, O, I]``.
    """

    fused: torch.Tensor
    parts: list[torch.Tensor]
    linear: bool = False
    grads: list[torch.Tensor] | None = None

    def _view(self, base: torch.Tensor, g: int) -> torch.Tensor:
        if self.parts[g].dim() == 0 or self.linear:
            return base[g]
        n = self.parts[g].shape[0]
        return base.narrow(0, g * n, n)

    def intact(self) -> bool:
        """True while every partition tensor still shares the fused storage."""
        ptr, size = self.fused.data_ptr(), self.fused.numel() * self.fused.element_size()
        return all(ptr <= p.data_ptr() < ptr + max(size, 1) for p in self.parts)

    def attach_grads(self) -> None:
        """Point every partition parameter's ``.grad`` at its slice of the fused gradient."""
        if self.grads is None:
            return
        for p, gv in zip(self.parts, self.grads):
            p.grad = gv


def fuse(parts: list[torch.Tensor], *, linear: bool = False, grad: bool | None = None) -> FusedTensor:
    """Concatenate sibling tensors into one storage and re-point each at its slice.

    Args:
        parts: G tensors of equal shape (parameters or buffers), one per sibling, in group order.
        linear: stack 2-d linear weights as ``[G, O, I]`` (for a batched matmul).
        grad: give the fused tensor ``requires_grad`` and a zeroed ``.grad`` whose slices become
            the partitions' gradients (default: when the parts require grad).

    Returns:
        The :class:`FusedTensor`.

    Raises:
        ValueError: if the parts differ in shape, dtype or device.
    """
    first = parts[0]
    if any(p.shape != first.shape or p.dtype != first.dtype or p.device != first.device for p in parts):
        raise ValueError("sibling tensors differ in shape, dtype or device: "
                         f"{[(tuple(p.shape), p.dtype, str(p.device)) for p in parts]}")
    grad = first.requires_grad if grad is None else grad
    with torch.no_grad():
        if first.dim() == 0 or linear:
            data = torch.stack([p.detach() for p in parts])
        else:
            data = torch.cat([p.detach() for p in parts], dim=0)
            if first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last) \
                    and not first.is_contiguous():
                data = data.contiguous(memory_format=torch.channels_last)
    ft = FusedTensor(data.requires_grad_(grad), list(parts), linear)
    for g, p in enumerate(parts):
        p.data = ft._view(data.detach(), g)
    if grad:
        ft.fused.grad = torch.zeros_like(data)
        ft.grads = [ft._view(ft.fused.grad, g) for g in range(len(parts))]
    return ft
