"""The fused form of the token (vision-transformer) ops over a module's G sibling groups (DESIGN §2.1).

Token values use the layouts of ``fusion/layouts.py`` with tokens channel-first:

    stack   (B, G·c, N)       group g's residual-stream channels g·c..(g+1)·c (module inputs and outputs)
    gtok    (G, B, N, c)      the same, token-last and group-major (contiguous): what the token ops work
                              in, so the G-batched matmuls and LayerNorms need no transposes
    gfull   (G, B, N, D)      group g's own view of a full-width tensor: a dense-in LayerNorm (the group's
                              own D affine parameters over the shared module input), or an aux head's
                              LayerNorm over cat(own live, siblings detached)

    op           shared in                     stack / gtok in                 mixed in
    patch_embed  dense conv p×p, W = cat_g W_g  —                               —
    pos_embed    —                             + pos_g (and CLS tokens); gtok  —
    layernorm    normalise once, G affines     per group over its c channels   per head over the channels it reads
                 → gfull                       → gtok                          (own live, others detached) → gfull
    attention    (gtok / gfull in) QKV, scaled dot product and projection as G-batched matmuls, one attention
                 call over a (G·B) batch; gtok out
    mlp          (gtok / gfull in) two G-batched matmuls around the activation; gtok out
    token_linear (gtok / gfull in) one G-batched matmul (AugLocal's projection shortcut); gtok out; on an aux
                 head's mixed input, each head's own-live / siblings-detached channels (``unmix.py``) first
    token_pool   mean over tokens (or the CLS token) → gstack (G, B, c); on a mixed value per channel, mixed out

Parameters: each builder fuses the G layers' tensors (``FusionBuild.fuse``); linear weights as ``[G, O, I]``.
Token ops have no padded form: an unequal split is refused (``FusedOpDef.token``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .layouts import FusionBuild, NodeGroup, NotFusable, Step, same
from .shared_head import SharedHeadLayerNorm
from .unmix import unmixer


def patch_embed(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """The G patch embeddings as one dense p×p conv of the shared image → stack."""
    n, lay = grp.node, grp.layout
    if lay != "shared":
        raise NotFusable(f"patch_embed {n.name} on a {lay} tensor")
    convs = [m.proj for m in grp.modules()]
    w = b.fuse([c.weight for c in convs])
    bias = b.fuse([c.bias for c in convs]) if convs[0].bias is not None else None
    p, name, arg = n.attrs["patch"], n.name, n.args[0]

    def step(env: dict) -> None:
        env[name] = F.conv2d(env[arg], w.fused, None if bias is None else bias.fused, p).flatten(2)
    return step, "stack"


def pos_embed(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """+ each group's position embedding (and its CLS token in front) → gtok."""
    n, lay = grp.node, grp.layout
    if lay not in ("stack", "gtok"):
        raise NotFusable(f"pos_embed {n.name} on a {lay} tensor")
    mods = grp.modules()
    pos = b.fuse([m.pos for m in mods])  # (G, c, N): group g's (1, c, N) in row g
    cls = b.fuse([m.cls for m in mods]) if mods[0].cls is not None else None
    G, name, arg = b.G, n.name, n.args[0]

    def step(env: dict) -> None:
        x = b.tokens(env[arg], lay)
        if cls is not None:
            x = torch.cat([cls.fused.transpose(1, 2).unsqueeze(1).expand(G, x.shape[1], 1, -1), x], dim=2)
        env[name] = (x + pos.fused.transpose(1, 2).unsqueeze(1)).contiguous()
    return step, "gtok"


def layernorm(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """G LayerNorms: per group over its channels (gtok), or per group over a full-width input (gfull)."""
    n, lay, mods = grp.node, grp.layout, grp.modules()
    same([(m.eps, m.elementwise_affine, tuple(m.normalized_shape)) for m in mods], f"layernorm {n.name}")
    if not mods[0].elementwise_affine or mods[0].bias is None:
        raise NotFusable(f"layernorm {n.name} without affine parameters")
    G, name, arg, eps = b.G, n.name, n.args[0], mods[0].eps
    w, bias = b.fuse([m.weight for m in mods]), b.fuse([m.bias for m in mods])
    if len(n.shape) != 2:
        raise NotFusable(f"layernorm {n.name} on flat features")
    if lay in ("stack", "gtok"):
        def grouped(env: dict) -> None:
            z = F.layer_norm(b.tokens(env[arg], lay), (w.fused.shape[0] // G,), None, None, eps)
            env[name] = torch.addcmul(bias.fused.view(G, 1, 1, -1), z, w.fused.view(G, 1, 1, -1))
        return grouped, "gtok"
    if lay == "shared":
        def dense(env: dict) -> None:
            x = env[arg]
            z = F.layer_norm(x.transpose(1, 2), (x.shape[1],), None, None, eps)  # (B, N, D)
            env[name] = torch.addcmul(bias.fused.view(G, 1, 1, -1), z.unsqueeze(0), w.fused.view(G, 1, 1, -1))
        return dense, "gfull"
    if lay != "mixed":
        raise NotFusable(f"layernorm {n.name} on a {lay} tensor")
    return _head_layernorm(b, grp, w.fused, bias.fused, eps), "gfull"


def _head_layernorm(b: FusionBuild, grp: NodeGroup, w: torch.Tensor, bias: torch.Tensor, eps: float) -> Step:
    """The aux heads' LayerNorms over a mixed value: once for all heads when each reads all of h in group
    order (:class:`SharedHeadLayerNorm`), else each head's own-live / siblings-detached input."""
    G, name, arg = b.G, grp.name, grp.arg
    got = b.channel_maps.get(arg)
    c = b.width
    cin = grp.node.shape[0]
    if got is None:  # r = 1 in group order: one normalisation for all heads
        def shared(env: dict) -> None:
            env[name] = SharedHeadLayerNorm.apply(env[arg][0], w, bias, G, eps)
        return shared
    idx = got[0].to(w.device)
    own = (idx // c == torch.arange(G, device=idx.device).unsqueeze(1)).view(1, G, cin, 1)
    flat = idx.reshape(-1)

    def mixed(env: dict) -> None:
        h = env[arg][0]
        B, _, N = h.shape
        live = h.index_select(1, flat).view(B, G, cin, N)
        x = torch.where(own, live, h.detach().index_select(1, flat).view(B, G, cin, N))  # own slice live
        z = F.layer_norm(x.permute(1, 0, 3, 2), (cin,), None, None, eps)  # (G, B, N, cin)
        env[name] = torch.addcmul(bias.view(G, 1, 1, -1), z, w.view(G, 1, 1, -1))
    return mixed


def _batched(b: FusionBuild, lins: list[torch.nn.Linear]) -> Callable[[torch.Tensor], torch.Tensor]:
    """G linear layers over (G, B, N, I) tokens as one batched matmul."""
    w = b.fuse([m.weight for m in lins], linear=True)  # (G, O, I)
    bias = b.fuse([m.bias for m in lins]) if lins[0].bias is not None else None
    G, n_out = b.G, lins[0].weight.shape[0]

    def apply(x: torch.Tensor) -> torch.Tensor:  # (G, B, N, I) -> (G, B, N, O)
        lead = x.shape[:3]
        x2 = x.view(G, -1, x.shape[3])
        wt = w.fused.transpose(1, 2)
        y = torch.bmm(x2, wt) if bias is None else torch.baddbmm(bias.fused.view(G, 1, n_out), x2, wt)
        return y.view(*lead, n_out)
    return apply


def attention(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """G multi-head self-attentions: G-batched QKV and projection, one attention call → gtok."""
    n, lay = grp.node, grp.layout
    if lay not in ("stack", "gtok", "gfull"):
        raise NotFusable(f"attention {n.name} on a {lay} tensor")
    mods = grp.modules()
    G, name, arg = b.G, n.name, n.args[0]
    H, d = mods[0].heads, mods[0].head_dim
    qkv, proj = _batched(b, [m.qkv for m in mods]), _batched(b, [m.proj for m in mods])

    def step(env: dict) -> None:
        x = b.tokens(env[arg], lay)  # (G, B, N, D_in)
        _, B, N, _ = x.shape
        q, k, v = qkv(x).view(G * B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # views, (G·B, H, N, d)
        o = F.scaled_dot_product_attention(q, k, v)  # all groups' heads at once, the G groups as batch
        o = o.transpose(1, 2).reshape(G, B, N, H * d)
        env[name] = proj(o)
    return step, "gtok"


def mlp(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """G MLPs: two G-batched matmuls around the activation → gtok."""
    n, lay = grp.node, grp.layout
    if lay not in ("stack", "gtok", "gfull"):
        raise NotFusable(f"mlp {n.name} on a {lay} tensor")
    mods = grp.modules()
    name, arg = n.name, n.args[0]
    act = F.gelu if n.attrs.get("act", "gelu") == "gelu" else F.silu
    fc1, fc2 = _batched(b, [m.fc1 for m in mods]), _batched(b, [m.fc2 for m in mods])

    def step(env: dict) -> None:
        env[name] = fc2(act(fc1(b.tokens(env[arg], lay))))
    return step, "gtok"


def token_linear(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """G per-token linear maps as one G-batched matmul → gtok."""
    n, lay = grp.node, grp.layout
    if lay not in ("stack", "gtok", "gfull", "mixed"):
        raise NotFusable(f"token_linear {n.name} on a {lay} tensor")
    name, arg = n.name, n.args[0]
    fc = _batched(b, [m.fc for m in grp.modules()])
    if lay == "mixed":  # on an aux head's input: each head's own-live / siblings-detached channels
        unmix, device = unmixer(b, arg, n.attrs["in"], f"token_linear {n.name}"), grp.modules()[0].fc.weight.device

        def mixed(env: dict) -> None:
            env[name] = fc(unmix(env[arg][0], device).transpose(2, 3).contiguous())  # (G, B, N, C_in)
        return mixed, "gtok"

    def step(env: dict) -> None:
        env[name] = fc(b.tokens(env[arg], lay))
    return step, "gtok"


def token_pool(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """Mean over tokens (or the CLS token) of each group → gstack (G, B, c)."""
    n, lay = grp.node, grp.layout
    name, arg, cls = n.name, n.args[0], n.attrs.get("cls", False)
    if lay == "mixed":  # an aux head's input (AugLocal pooling it): per channel, the channel map kept
        b.channel_maps[name] = b.channel_maps.get(arg)

        def mixed(env: dict) -> None:
            x = env[arg][0]
            env[name] = (x[:, :, 0] if cls else x.mean(dim=2),)
        return mixed, "mixed"
    if lay not in ("stack", "gtok", "gfull"):
        raise NotFusable(f"token_pool {n.name} on a {lay} tensor")
    G = b.G

    def step(env: dict) -> None:
        x = env[arg]
        if lay == "stack":  # (B, G·c, N) -> (G, B, c)
            x = (x[:, :, 0] if cls else x.mean(dim=2))
            env[name] = x.view(x.shape[0], G, -1).transpose(0, 1)
        else:
            env[name] = x[:, :, 0] if cls else x.mean(dim=2)
    return step, "gstack"
