"""Registry entries of the token (vision-transformer) ops (DESIGN §2.1).

Token tensors are stored channel-first, like feature maps: a batch is ``B × D × N``
(D channels of the residual stream, N tokens) and a per-sample shape is ``(D, N)``.
So channel slices, concatenation and stop-gradient sharing act on dim 1 exactly as
for convolutions; the ops below transpose to ``B × N × D`` internally.

    patch_embed  (C, H, W) -> (D, N)      conv p×p / stride p, then tokens
    pos_embed    (D, N)    -> (D, N[+1])  learned positions (and a CLS token with cls)
    layernorm    (D, N) | (D,)            over the channels of its input
    attention    (D_in, N) -> (D_out, N)  QKV, scaled dot product, output projection
    mlp          (D_in, N) -> (D_out, N)  Linear → GELU → Linear
    token_pool   (D, N)    -> (D,)        mean over tokens, or the CLS token
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GraphError

Shape = tuple[int, ...]
Attrs = dict[str, Any]


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def need_tokens(kind: str, ins: list[Shape]) -> tuple[int, int]:
    """``(D, N)`` of a token input.

    Raises:
        GraphError: the input is a feature map or flat features.
    """
    s = ins[0]
    if len(s) == 3:
        raise GraphError(f"{kind} needs tokens (D×N) but gets a C×H×W feature map of shape {list(s)}; "
                         "put a 'patch_embed' before the first token op")
    if len(s) != 2:
        raise GraphError(f"{kind} needs tokens (D×N) but gets flat features of shape {list(s)}; "
                         "put it before the 'token_pool'")
    return s  # type: ignore[return-value]


# --- modules (channel-first: B × D × N) -----------------------------------------------------


class PatchEmbed(nn.Module):
    """Conv p×p with stride p, flattened to tokens: ``B×C×H×W -> B×D×N``."""

    def __init__(self, c_in: int, dim: int, patch: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(c_in, dim, patch, patch, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.proj(x).flatten(2)


class PosEmbed(nn.Module):
    """Learned positional embedding ``(1, D, N)``; with ``cls`` a learned CLS token is prepended first."""

    def __init__(self, dim: int, tokens: int, cls: bool = False):
        super().__init__()
        self.cls = nn.Parameter(torch.empty(1, dim, 1)) if cls else None
        self.pos = nn.Parameter(torch.empty(1, dim, tokens + int(cls)))
        if not self.pos.is_meta:  # codegen builds on 'meta' and initialises later (init_weights)
            self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, 0.02) positions and CLS token."""
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, 0.02, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=2)
        return x + self.pos


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over dim 1 of ``B×D×N`` tokens (or over the features of ``B×D``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dim() == 2:
            return super().forward(x)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention on ``B×D_in×N``: QKV → ``F.scaled_dot_product_attention`` → projection.

    Args:
        d_in: input channels (all of the module input for a dense-in block, else the group's slice).
        d_out: output channels.
        heads: number of heads; each has ``head_dim`` channels.
        head_dim: channels per head.
        bias: biases of the QKV and output projections.
    """

    def __init__(self, d_in: int, d_out: int, heads: int, head_dim: int, bias: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(d_in, 3 * heads * head_dim, bias=bias)
        self.proj = nn.Linear(heads * head_dim, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, _, n = x.shape
        qkv = self.qkv(x.transpose(1, 2)).view(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B × heads × N × head_dim
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)).transpose(1, 2)


class MLP(nn.Module):
    """Linear(D_in→hidden) → GELU (or SiLU) → Linear(hidden→D_out) on ``B×D×N`` tokens."""

    def __init__(self, d_in: int, hidden: int, d_out: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU() if act == "gelu" else nn.SiLU()
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc2(self.act(self.fc1(x.transpose(1, 2)))).transpose(1, 2)


def token_pool(x: torch.Tensor, cls: bool = False) -> torch.Tensor:
    """``B×D×N`` → ``B×D``: the mean over tokens, or the first (CLS) token when ``cls``."""
    return x[:, :, 0] if cls else x.mean(dim=2)


# --- shape / MAC / parameter rules -----------------------------------------------------------


def _patch_shape(a: Attrs, ins: list[Shape]) -> Shape:
    s = ins[0]
    if len(s) != 3:
        raise GraphError(f"patch_embed needs a C×H×W image or feature map but gets shape {list(s)}")
    c, h, w = s
    p = a["patch"]
    if c != a["in"]:
        raise GraphError(f"patch_embed expects {a['in']} input channels, gets {c}")
    if h % p or w % p:
        common = math.gcd(h, w)
        raise GraphError(f"patch size {p} does not divide the {h}×{w} input; valid patch sizes: {_divisors(common)}")
    return (a["out"], (h // p) * (w // p))


def _patch_macs(a: Attrs, ins: list[Shape], out: Shape) -> int:
    return out[0] * a["in"] * a["patch"] ** 2 * out[1]


def _patch_params(a: Attrs, ins: list[Shape], out: Shape) -> int:
    return a["out"] * a["in"] * a["patch"] ** 2 + (a["out"] if a["bias"] else 0)


def _pos_shape(a: Attrs, ins: list[Shape]) -> Shape:
    d, n = need_tokens("pos_embed", ins)
    return (d, n + int(a["cls"]))


def _ln_shape(a: Attrs, ins: list[Shape]) -> Shape:
    if len(ins[0]) == 3:
        raise GraphError(f"layernorm needs tokens (D×N) or flat features but gets a C×H×W map of shape "
                         f"{list(ins[0])}; put a 'patch_embed' before it")
    return ins[0]


def _attn_shape(a: Attrs, ins: list[Shape]) -> Shape:
    d, n = need_tokens("attention", ins)
    if d != a["in"]:
        raise GraphError(f"attention expects {a['in']} input channels, gets {d}")
    return (a["out"], n)


def _attn_macs(a: Attrs, ins: list[Shape], out: Shape) -> int:
    inner = a["heads"] * a["head_dim"]
    n = out[1]
    qkv, proj = n * a["in"] * 3 * inner, n * inner * a["out"]
    scores = 2 * a["heads"] * n * n * a["head_dim"]  # QKᵀ and A·V
    return qkv + scores + proj


def _attn_params(a: Attrs, ins: list[Shape], out: Shape) -> int:
    inner = a["heads"] * a["head_dim"]
    bias = 3 * inner + a["out"] if a["bias"] else 0
    return a["in"] * 3 * inner + inner * a["out"] + bias


def _mlp_shape(a: Attrs, ins: list[Shape]) -> Shape:
    d, n = need_tokens("mlp", ins)
    if d != a["in"]:
        raise GraphError(f"mlp expects {a['in']} input channels, gets {d}")
    return (a["out"], n)


def _pool_shape(a: Attrs, ins: list[Shape]) -> Shape:
    d, _ = need_tokens("token_pool", ins)
    return (d,)


def transformer_op_defs(op_def: Any) -> dict[str, Any]:
    """The registry entries of the token ops.

    Args:
        op_def: the :class:`~gndgl_compiler.graph.ops.OpDef` class (passed in to avoid an import cycle).

    Returns:
        ``{kind: OpDef}``.
    """
    same = lambda a, i: i[0]  # noqa: E731
    return {
        "patch_embed": op_def(
            "patch_embed", _patch_shape, _patch_macs, _patch_params,
            lambda a, i, o: PatchEmbed(a["in"], a["out"], a["patch"], a["bias"]), split="weights",
            label=lambda a: f" {a.get('patch')}×{a.get('patch')}"),
        "pos_embed": op_def("pos_embed", _pos_shape, params=lambda a, i, o: o[0] * o[1] + (o[0] if a["cls"] else 0),
                            module=lambda a, i, o: PosEmbed(i[0][0], i[0][1], a["cls"])),
        "layernorm": op_def("layernorm", _ln_shape, params=lambda a, i, o: 2 * i[0][0],
                            module=lambda a, i, o: ChannelLayerNorm(i[0][0], eps=1e-6), leads_in=True),
        "gelu": op_def("gelu", same, function=F.gelu),
        "silu": op_def("silu", same, function=F.silu),
        "attention": op_def(
            "attention", _attn_shape, _attn_macs, _attn_params,
            lambda a, i, o: Attention(a["in"], a["out"], a["heads"], a["head_dim"], a["bias"]),
            split="weights", split_keys=("out", "heads"), label=lambda a: f" {a.get('heads')}h"),
        "mlp": op_def(
            "mlp", _mlp_shape, lambda a, i, o: o[1] * (a["in"] * a["hidden"] + a["hidden"] * a["out"]),
            lambda a, i, o: a["in"] * a["hidden"] + a["hidden"] + a["hidden"] * a["out"] + a["out"],
            lambda a, i, o: MLP(a["in"], a["hidden"], a["out"], a.get("act", "gelu")),
            split="weights", split_keys=("out", "hidden"), label=lambda a: f" {a.get('hidden')}"),
        "token_pool": op_def("token_pool", _pool_shape, function=token_pool, kwargs=lambda a, i: {"cls": a["cls"]},
                             leads_in=True),
    }
