"""The torch modules of the token (vision-transformer) ops; their registry entries (shapes,
MACs, parameters) are in :mod:`.transformer_ops`.

Token tensors are channel-first, ``B × D × N``; the modules transpose to ``B × N × D`` inside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn



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


class TokenLinear(nn.Module):
    """A bias-free linear map of every token's channels, D_in → D_out, on ``B×D×N`` (a projection shortcut)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(x.transpose(1, 2)).transpose(1, 2)


def token_pool(x: torch.Tensor, cls: bool = False) -> torch.Tensor:
    """``B×D×N`` → ``B×D``: the mean over tokens, or the first (CLS) token when ``cls``."""
    return x[:, :, 0] if cls else x.mean(dim=2)
