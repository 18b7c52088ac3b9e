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

Siblings of unequal widths (a balanced split: 22, 22, 21, ...) fuse *padded* (:func:`fuse_padded`):
each group's block is padded to the widest group's rows (and, for grouped / batched layers, input
columns) with exact zeros, and partition g's tensor is the view of its real sub-block (possibly not
contiguous). The padded entries belong to no parameter, so no optimizer, weight decay or
``load_state_dict`` ever writes them: they stay zero.

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
    index: list[tuple[object, ...]] | None = None
    """Padded storage: partition g's sub-block is ``fused[index[g]]`` (None: the equal-width layout)."""

    def _view(self, base: torch.Tensor, g: int) -> torch.Tensor:
        if self.index is not None:
            return base[self.index[g]]
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


def fuse_padded(parts: list[torch.Tensor], rows: int, cols: int | None = None, *, stacked: bool = False,
                fill: float = 0.0, grad: bool | None = None) -> FusedTensor:
    """Like :func:`fuse` for siblings of unequal widths: each group's block padded with ``fill``.

    Args:
        parts: G tensors (o_g, [i_g, k...]) of equal rank, dtype and device, one per sibling, in group order.
        rows: the padded output width (at least every o_g).
        cols: the padded input width of 2-d+ tensors (None: every i_g, which must then be equal).
        stacked: lay the groups out as ``[G, rows, cols, ...]`` (batched linear) instead of ``[G·rows, cols, ...]``.
        fill: the value of the padded entries (0; 1 for a running variance).
        grad: as for :func:`fuse`.

    Returns:
        The :class:`FusedTensor`; partition g's tensor is ``fused[index[g]]``.

    Raises:
        ValueError: ranks, trailing shapes, dtypes or devices differ, or a part is wider than the padding.
    """
    first, G = parts[0], len(parts)
    trail = {tuple(p.shape[2:]) for p in parts}
    if any(p.dim() != first.dim() or p.dtype != first.dtype or p.device != first.device for p in parts) \
            or len(trail) != 1 or first.dim() == 0 or any(p.shape[0] > rows for p in parts):
        raise ValueError(f"sibling tensors cannot be padded together: {[(tuple(p.shape), p.dtype) for p in parts]}")
    if first.dim() > 1:
        cols = cols if cols is not None else first.shape[1]
        if any(p.shape[1] > cols for p in parts):
            raise ValueError(f"a sibling tensor is wider than {cols} columns: {[tuple(p.shape) for p in parts]}")
    inner = ((cols,) if first.dim() > 1 else ()) + tuple(first.shape[2:])
    shape = (G, rows, *inner) if stacked else (G * rows, *inner)
    index = []
    for g, p in enumerate(parts):
        r = (g, slice(0, p.shape[0])) if stacked else (slice(g * rows, g * rows + p.shape[0]),)
        index.append(r + ((slice(0, p.shape[1]),) if p.dim() > 1 else ()))
    grad = first.requires_grad if grad is None else grad
    with torch.no_grad():
        data = torch.full(shape, fill, dtype=first.dtype, device=first.device)
        for p, ix in zip(parts, index):
            data[ix] = p.detach()
        if first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous():
            data = data.contiguous(memory_format=torch.channels_last)
    ft = FusedTensor(data.requires_grad_(grad), list(parts), stacked, index=index)
    for g, p in enumerate(parts):
        p.data = ft._view(data.detach(), g)
    if grad:
        ft.fused.grad = torch.zeros_like(data)
        ft.grads = [ft._view(ft.fused.grad, g) for g in range(G)]
    return ft


def fuse_layer(parts: list[torch.Tensor], cols: int | None = None, *, stacked: bool = False,
               fill: float = 0.0, grad: bool | None = None) -> FusedTensor:
    """Fuse one layer's sibling tensors: :func:`fuse` when their shapes are equal (and fill ``cols``),
    else padded to the widest rows and ``cols`` columns (:func:`fuse_padded`).

    Args:
        parts: the G sibling tensors, in group order.
        cols: the padded input width of a grouped / batched layer (None: the parts' own).
        stacked: a batched linear weight (``[G, O, I]``).
        fill: the padded entries' value.
        grad: as for :func:`fuse`.

    Returns:
        The :class:`FusedTensor`.
    """
    first = parts[0]
    if all(p.shape == first.shape for p in parts) and (cols is None or first.dim() < 2 or cols == first.shape[1]):
        return fuse(parts, linear=stacked, grad=grad)
    return fuse_padded(parts, max(p.shape[0] for p in parts), cols, stacked=stacked, fill=fill, grad=grad)
