"""The aux heads' first layer over ``cat(own slice live, siblings detached)``, for all G heads at once.

:class:`SharedHeadConv` (a conv, or a linear layer as a 1-d conv) and :class:`SharedHeadLayerNorm`
(a token head's LayerNorm, share ratio 1) keep each head's input gradient on its own channels.

Head g's first layer reads the whole module output h (C = G·c channels) but only its own slice
carries gradient. Its forward value is simply conv(h, W_g); so for all heads together:

    forward           out = conv(h, W)                  W = cat_g W_g  (G·O outputs, one dense conv)
    grad of W         the dense conv's weight gradient  (h as data)
    grad of h         conv input-gradient with groups=G through diag_g W_g[:, own slice g]

which is exactly the gradient of the per-partition heads: siblings' slices are constants there,
so no head sends gradient into another group's body. Works for 2-d convs and, with (B, D, 1)
features, for linear layers as 1-d convs.
"""

from __future__ import annotations

import torch


def own_columns(w: torch.Tensor, groups: int) -> torch.Tensor:
    """``diag_g W_g[:, own slice g]``: the (G·O, c, k...) weight of the grouped input-gradient conv.

    Args:
        w: fused weight (G·O, G·c, k...), head g's weight in rows g·O..(g+1)·O.
        groups: G.
    """
    go, gc = w.shape[0], w.shape[1]
    o, c, ks = go // groups, gc // groups, tuple(w.shape[2:])
    return w.view(groups, o, groups, c, *ks).diagonal(0, 0, 2).movedim(-1, 0).reshape(go, c, *ks)


class SharedHeadConv(torch.autograd.Function):
    """``conv(h, W, bias)`` whose input gradient reaches each head's own channel slice only.

    ``apply(h, w, bias, groups, stride, padding, own)``; ``stride`` and ``padding`` are lists with one
    entry per spatial dim; ``bias`` may be None. ``own``, when given, is the 0/1 mask of each head's own
    input columns (broadcast over the kernel): the input gradient is then one dense conv with the masked
    weight instead of the grouped conv (faster on a CPU for few channels; the same exact zeros).
    """

    @staticmethod
    def forward(ctx, h, w, bias, groups, stride, padding, own=None):  # noqa: ANN001 - autograd.Function signature
        ctx.save_for_backward(h, w)
        ctx.own = own
        ctx.conf = (groups, stride, padding, bias is not None)
        conv = torch.nn.functional.conv2d if w.dim() == 4 else torch.nn.functional.conv1d
        return conv(h, w, bias, stride, padding)

    @staticmethod
    def backward(ctx, gout):  # noqa: ANN001 - autograd.Function signature
        h, w = ctx.saved_tensors
        groups, stride, padding, has_bias = ctx.conf
        n = w.dim() - 2
        dt = gout.dtype
        hd, wd = h.to(dt), w.to(dt)
        ones, zeros = [1] * n, [0] * n
        gin = gw = gb = None
        if ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2]):
            _, gw, gb = torch.ops.aten.convolution_backward(
                gout, hd, wd, [w.shape[0]] if has_bias else None, stride, padding, ones, False, zeros, 1,
                [False, ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]])
        if ctx.needs_input_grad[0]:
            if ctx.own is not None:
                wi, gi = wd * ctx.own.to(dt), 1
            else:
                wi, gi = own_columns(wd, groups), groups
            gin = torch.ops.aten.convolution_backward(
                gout, hd, wi, None, stride, padding, ones, False, zeros, gi, [True, False, False])[0]
        return (None if gin is None else gin.to(h.dtype), None if gw is None else gw.to(w.dtype),
                None if gb is None else gb.to(w.dtype), None, None, None, None)


class SharedHeadLayerNorm(torch.autograd.Function):
    """The G aux heads' LayerNorms over ``cat(own live, siblings detached)`` when each reads all of h in
    group order (share_ratio 1): ``apply(h, w, b, G, eps)`` with h (B, G·c, N), w and b (G·D,) → (G, B, N, D).

    The normalised value is the same for every head, so it is computed once; head g's input gradient is
    the LayerNorm backward of its own affine output, kept on its own channels (the siblings' are constants):

        dz_g = gout_g · w_g      dx[own g] = rstd · (dz_g − mean(dz_g) − z · mean(dz_g · z))[own g]
    """

    @staticmethod
    def forward(ctx, h, w, b, G, eps):  # noqa: ANN001 - autograd.Function signature
        x = h.transpose(1, 2)
        if x.dtype in (torch.float16, torch.bfloat16):  # as F.layer_norm under autocast: in float32
            x = x.float()
        D = x.shape[2]
        z, _, rstd = torch.native_layer_norm(x, (D,), None, None, eps)
        w4, b4 = w.to(z.dtype).view(G, 1, 1, D), b.to(z.dtype).view(G, 1, 1, D)
        ctx.save_for_backward(z, rstd, w4)
        ctx.conf = (G, h.dtype, w.dtype)
        return torch.addcmul(b4, z.unsqueeze(0), w4)

    @staticmethod
    def backward(ctx, gout):  # noqa: ANN001 - autograd.Function signature
        z, rstd, w4 = ctx.saved_tensors
        G, hdt, wdt = ctx.conf
        B, N, D = z.shape
        c = D // G
        gw = (gout * z).sum((1, 2)).reshape(-1).to(wdt) if ctx.needs_input_grad[1] else None
        gb = gout.sum((1, 2)).reshape(-1).to(wdt) if ctx.needs_input_grad[2] else None
        gh = None
        if ctx.needs_input_grad[0]:
            dz = gout * w4  # (G, B, N, D)
            m1 = dz.mean(3, keepdim=True).permute(1, 2, 0, 3)  # (B, N, G, 1)
            m2 = (dz * z).mean(3, keepdim=True).permute(1, 2, 0, 3)
            own = dz.view(G, B, N, G, c).diagonal(0, 0, 3).movedim(-1, 2)  # (B, N, G, c): head g, channels of g
            zg = z.view(B, N, G, c)
            gh = (rstd.unsqueeze(3) * (own - m1 - zg * m2)).reshape(B, N, D).transpose(1, 2).to(hdt)
        return gh, gw, gb, None, None
