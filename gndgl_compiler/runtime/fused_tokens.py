"""The fused form of the token (vision-transformer) ops over a module's G sibling groups (DESIGN §2.1).

Token values use the layouts of ``runtime/fused_ops.py`` with tokens channel-first, plus one more:

    stack   (B, G·c, N)       group g's residual-stream channels g·c..(g+1)·c (module inputs and outputs)
    gtok    (G, B, N, c)      the same, token-last and group-major (contiguous): what the token ops work
                              in, so the G-batched matmuls and LayerNorms need no transposes
    gfull   (G, B, N, D)      group g's own view of a full-width tensor: a dense-in LayerNorm (the group's
                              own D affine parameters over the shared module input), or an aux head's
                              LayerNorm over cat(own live, siblings detached)

    op           shared in                     stack in                        mixed in
    op           shared in                     stack / gtok in                 mixed in
    patch_embed  dense conv p×p, W = cat_g W_g  —                               —
    pos_embed    —                             + pos_g (and CLS tokens); gtok  —
    layernorm    normalise once, G affines     per group over its c channels   per head over the channels it reads
                 → gfull                       → gtok                          (own live, others detached) → gfull
    attention    (gtok / gfull in) QKV, scaled dot product and projection as G-batched matmuls, one attention
                 call over a (G·B) batch; gtok out
    mlp          (gtok / gfull in) two G-batched matmuls around the activation; gtok out
    token_pool   mean over tokens (or the CLS token) → gstack (G, B, c)
    add          gtok + gtok; a stack operand (the dense-in block's identity slice) is made gtok first

Each builder fuses the G layers' parameters (``runtime/fuse_storage.py``) and returns a step ``env -> None``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..partition.plan import IRNode
from .fuse_storage import FusedTensor, fuse
from .fused_ops import NotFusable, Step, _same


class FusedTokenOps:
    """The token-op builders of :class:`~gndgl_compiler.runtime.fused.FusedStage` (its ``G``, ``width``,
    ``tensors`` and ``_cols``)."""

    G: int
    width: int
    tensors: list[FusedTensor]
    _cols: dict

    def _tensor(self, parts: list[torch.Tensor], linear: bool = False) -> FusedTensor:
        ft = fuse(parts, linear=linear)
        self.tensors.append(ft)
        return ft

    def _patch_embed(self, n: IRNode, lay: str, mods: list[torch.nn.Module]) -> tuple[Step, str]:
        if lay != "shared":
            raise NotFusable(f"patch_embed {n.name} on a {lay} tensor")
        convs = [m.proj for m in mods]
        w = self._tensor([c.weight for c in convs])
        b = self._tensor([c.bias for c in convs]) if convs[0].bias is not None else None
        p, name, arg = n.attrs["patch"], n.name, n.args[0]

        def step(env: dict) -> None:
            env[name] = F.conv2d(env[arg], w.fused, None if b is None else b.fused, p).flatten(2)
        return step, "stack"

    def _pos_embed(self, n: IRNode, lay: str, mods: list[torch.nn.Module]) -> tuple[Step, str]:
        if lay not in ("stack", "gtok"):
            raise NotFusable(f"pos_embed {n.name} on a {lay} tensor")
        pos = self._tensor([m.pos for m in mods])  # (G, c, N): group g's (1, c, N) in row g
        cls = self._tensor([m.cls for m in mods]) if mods[0].cls is not None else None
        G, name, arg = self.G, n.name, n.args[0]

        def step(env: dict) -> None:
            x = self.tokens(env[arg], lay)
            if cls is not None:
                x = torch.cat([cls.fused.transpose(1, 2).unsqueeze(1).expand(G, x.shape[1], 1, -1), x], dim=2)
            env[name] = (x + pos.fused.transpose(1, 2).unsqueeze(1)).contiguous()
        return step, "gtok"

    def _layernorm(self, n: IRNode, lay: str, mods: list[torch.nn.Module]) -> tuple[Step, str]:
        _same([(m.eps, m.elementwise_affine, tuple(m.normalized_shape)) for m in mods], f"layernorm {n.name}")
        if not mods[0].elementwise_affine or mods[0].bias is None:
            raise NotFusable(f"layernorm {n.name} without affine parameters")
        G, name, arg, eps = self.G, n.name, n.args[0], mods[0].eps
        w, b = self._tensor([m.weight for m in mods]), self._tensor([m.bias for m in mods])
        if len(n.shape) != 2:
            raise NotFusable(f"layernorm {n.name} on flat features")
        if lay in ("stack", "gtok"):
            def grouped(env: dict) -> None:
                z = F.layer_norm(self.tokens(env[arg], lay), (w.fused.shape[0] // G,), None, None, eps)
                env[name] = torch.addcmul(b.fused.view(G, 1, 1, -1), z, w.fused.view(G, 1, 1, -1))
            return grouped, "gtok"
        if lay == "shared":
            def dense(env: dict) -> None:
                x = env[arg]
                z = F.layer_norm(x.transpose(1, 2), (x.shape[1],), None, None, eps)  # (B, N, D)
                env[name] = torch.addcmul(b.fused.view(G, 1, 1, -1), z.unsqueeze(0), w.fused.view(G, 1, 1, -1))
            return dense, "gfull"
        if lay != "mixed":
            raise NotFusable(f"layernorm {n.name} on a {lay} tensor")
        got = self._cols.get(arg)
        c = self.width
        cin = n.shape[0]
        if got is None:  # r = 1 in group order: one normalisation for all heads
            def shared(env: dict) -> None:
                env[name] = SharedHeadLayerNorm.apply(env[arg][0], w.fused, b.fused, G, eps)
            return shared, "gfull"
        idx = got[0] if got is not None else torch.arange(G * c).expand(G, G * c)
        idx = idx.to(w.fused.device)
        own = (idx // c == torch.arange(G, device=idx.device).unsqueeze(1)).view(1, G, cin, 1)
        flat = idx.reshape(-1)

        def mixed(env: dict) -> None:
            h = env[arg][0]
            B, _, N = h.shape
            live = h.index_select(1, flat).view(B, G, cin, N)
            x = torch.where(own, live, h.detach().index_select(1, flat).view(B, G, cin, N))  # own slice live
            z = F.layer_norm(x.permute(1, 0, 3, 2), (cin,), None, None, eps)  # (G, B, N, cin)
            env[name] = torch.addcmul(b.fused.view(G, 1, 1, -1), z, w.fused.view(G, 1, 1, -1))
        return mixed, "gfull"

    def tokens(self, x: torch.Tensor, lay: str) -> torch.Tensor:
        """A stack (B, G·c, N) token value as gtok (G, B, N, c) (a copy); gtok / gfull as they are."""
        if lay != "stack":
            return x
        B, C, N = x.shape
        return x.view(B, self.G, C // self.G, N).permute(1, 0, 3, 2).contiguous()

    @staticmethod
    def stacked(y: torch.Tensor) -> torch.Tensor:
        """gtok (G, B, N, c) → the stack (B, G·c, N) (a module's output)."""
        G, B, N, c = y.shape
        return y.permute(1, 0, 3, 2).reshape(B, G * c, N)

    def _batched(self, lins: list[torch.nn.Linear]) -> "callable":
        w = self._tensor([m.weight for m in lins], linear=True)  # (G, O, I)
        b = self._tensor([m.bias for m in lins]) if lins[0].bias is not None else None
        G, O = self.G, lins[0].weight.shape[0]

        def apply(x: torch.Tensor) -> torch.Tensor:  # (G, B, N, I) -> (G, B, N, O)
            lead = x.shape[:3]
            x2 = x.view(G, -1, x.shape[3])
            wt = w.fused.transpose(1, 2)
            y = torch.bmm(x2, wt) if b is None else torch.baddbmm(b.fused.view(G, 1, O), x2, wt)
            return y.view(*lead, O)
        return apply

    def _attention(self, n: IRNode, lay: str, mods: list[torch.nn.Module]) -> tuple[Step, str]:
        if lay not in ("stack", "gtok", "gfull"):
            raise NotFusable(f"attention {n.name} on a {lay} tensor")
        G, name, arg = self.G, n.name, n.args[0]
        H, d = mods[0].heads, mods[0].head_dim
        qkv, proj = self._batched([m.qkv for m in mods]), self._batched([m.proj for m in mods])

        def step(env: dict) -> None:
            x = self.tokens(env[arg], lay)  # (G, B, N, D_in)
            _, B, N, _ = x.shape
            q, k, v = qkv(x).view(G * B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # views, (G·B, H, N, d)
            o = F.scaled_dot_product_attention(q, k, v)  # all groups' heads at once, the G groups as batch
            o = o.transpose(1, 2).reshape(G, B, N, H * d)
            env[name] = proj(o)
        return step, "gtok"

    def _mlp(self, n: IRNode, lay: str, mods: list[torch.nn.Module]) -> tuple[Step, str]:
        if lay not in ("stack", "gtok", "gfull"):
            raise NotFusable(f"mlp {n.name} on a {lay} tensor")
        G, name, arg = self.G, n.name, n.args[0]
        act = F.gelu if n.attrs.get("act", "gelu") == "gelu" else F.silu
        fc1, fc2 = self._batched([m.fc1 for m in mods]), self._batched([m.fc2 for m in mods])

        def step(env: dict) -> None:
            env[name] = fc2(act(fc1(self.tokens(env[arg], lay))))
        return step, "gtok"

    def _token_pool(self, n: IRNode, lay: str) -> tuple[Step, str]:
        name, arg, cls = n.name, n.args[0], n.attrs.get("cls", False)
        if lay not in ("stack", "gtok", "gfull"):
            raise NotFusable(f"token_pool {n.name} on a {lay} tensor")

        def step(env: dict) -> None:
            x = env[arg]
            if lay == "stack":  # (B, G·c, N) -> (G, B, c)
                x = (x[:, :, 0] if cls else x.mean(dim=2))
                env[name] = x.view(x.shape[0], self.G, -1).transpose(0, 1)
            else:
                env[name] = x[:, :, 0] if cls else x.mean(dim=2)
        return step, "gstack"

    def _token_add(self, name: str, args: list[str], lays: list[str]) -> Step:
        """``add`` of token values, one of them gtok: a stack operand is made gtok first."""
        def step(env: dict) -> None:
            a, b = (self.tokens(env[x], lay) for x, lay in zip(args, lays))
            env[name] = a + b
        return step


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
