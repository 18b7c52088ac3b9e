"""Auxiliary and final heads as IR (so they share shape/MAC rules with bodies).

Each builder appends ops reading IR node ``x`` and returns the named outputs:
``logits`` (class scores), and for some kinds ``sim`` (predsim), ``recon`` and
``proj`` (InfoPro).
"""

from __future__ import annotations

from typing import Callable

from ..errors import PartitionError
from .auglocal import head_auglocal
from .ir import IRBuilder


def _mlp(b: IRBuilder, x: str, dims: list[int], tag: str) -> str:
    for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
        x = b.add(f"{tag}fc{i + 1}", "linear", {"in": d_in, "out": d_out, "bias": True}, [x])
        if i + 2 < len(dims):
            x = b.add(f"{tag}relu{i + 2}", "relu", {}, [x])
    return x


def head_1c2f(b: IRBuilder, x: str, classes: int, hidden: int, out: int | None = None, tag: str = "") -> dict[str, str]:
    """Conv3×3(C→2C, stride 2) → BN → ReLU → global pool → Linear(2C→F) → ReLU → Linear(F→classes)."""
    shape = b.shape(x)
    out = out or classes
    if len(shape) == 1:
        return {"logits": _mlp(b, x, [shape[0], hidden, out], tag)}
    c = shape[0]
    h = b.add(f"{tag}conv", "conv", {"in": c, "out": 2 * c, "kernel": 3, "stride": 2, "padding": 1, "bias": False}, [x])
    h = b.add(f"{tag}bn", "bn", {}, [h])
    h = b.add(f"{tag}relu1", "relu", {}, [h])
    h = b.add(f"{tag}pool", "adaptive_avgpool", {"size": 1}, [h])
    h = b.add(f"{tag}flatten", "flatten", {}, [h])
    return {"logits": _mlp(b, h, [2 * c, hidden, out], tag)}


def head_linear(b: IRBuilder, x: str, classes: int, hidden: int) -> dict[str, str]:
    """Global average pool → Linear(C→classes) (the 'greedy SL' baseline)."""
    if len(b.shape(x)) == 3:
        x = b.add("pool", "adaptive_avgpool", {"size": 1}, [x])
        x = b.add("flatten", "flatten", {}, [x])
    return {"logits": _mlp(b, x, [b.shape(x)[0], classes], "")}


def head_mlp_sr(b: IRBuilder, x: str, classes: int, hidden: int) -> dict[str, str]:
    """DGL's head: pool to ≤8×8, two 1×1 conv-BN-ReLU, pool to 2×2, 3-layer MLP."""
    shape = b.shape(x)
    if len(shape) == 1:
        return {"logits": _mlp(b, x, [shape[0], hidden, hidden, classes], "")}
    c = shape[0]
    h = x
    if shape[1] > 8 or shape[2] > 8:
        h = b.add("pool1", "adaptive_avgpool", {"size": min(shape[1], 8)}, [h])
    for i in (1, 2):
        h = b.add(f"conv{i}", "conv", {"in": c, "out": c, "kernel": 1, "stride": 1, "padding": 0, "bias": False}, [h])
        h = b.add(f"bn{i}", "bn", {}, [h])
        h = b.add(f"relu{i}", "relu", {}, [h])
    h = b.add("pool2", "adaptive_avgpool", {"size": min(2, b.shape(h)[1])}, [h])
    h = b.add("flatten", "flatten", {}, [h])
    return {"logits": _mlp(b, h, [b.shape(h)[0], hidden, hidden, classes], "")}


def head_predsim(b: IRBuilder, x: str, classes: int, hidden: int) -> dict[str, str]:
    """predsim (Nøkland & Eidnes): ``sim`` = Conv3×3(h) for S(·), ``logits`` = Linear(pool(h)) with C·h·w ≤ 2048."""
    shape = b.shape(x)
    if len(shape) == 1:
        return {"sim": x, "logits": _mlp(b, x, [shape[0], classes], "")}
    c, hh, _ = shape
    sim = b.add("sim_conv", "conv", {"in": c, "out": c, "kernel": 3, "stride": 1, "padding": 1, "bias": False}, [x])
    size = hh
    while c * size * size > 2048 and size > 1:
        size = (size + 1) // 2
    h = b.add("pool", "adaptive_avgpool", {"size": size}, [x])
    h = b.add("flatten", "flatten", {}, [h])
    return {"sim": sim, "logits": _mlp(b, h, [b.shape(h)[0], classes], "")}


def head_infopro(b: IRBuilder, x: str, classes: int, hidden: int, *, image_shape: list[int], variant: str,
                 projection: int) -> dict[str, str]:
    """InfoPro: decoder reconstructing the image, plus a 1c2f classifier or 1c2f projection."""
    shape = b.shape(x)
    if len(shape) != 3:
        raise PartitionError("the infopro head needs a feature map; use it on convolutional modules only")
    c = shape[0]
    h = b.add("dec_up", "upsample", {"height": image_shape[1], "width": image_shape[2]}, [x])
    h = b.add("dec_conv1", "conv", {"in": c, "out": 12, "kernel": 3, "stride": 1, "padding": 1, "bias": False}, [h])
    h = b.add("dec_bn", "bn", {}, [h])
    h = b.add("dec_relu", "relu", {}, [h])
    h = b.add("dec_conv2", "conv", {"in": 12, "out": image_shape[0], "kernel": 3, "stride": 1, "padding": 1,
                                    "bias": True}, [h])
    recon = b.add("dec_sigmoid", "sigmoid", {}, [h])
    if variant == "softmax":
        return {"recon": recon, **head_1c2f(b, x, classes, hidden, tag="cls_")}
    z = head_1c2f(b, x, classes, hidden, out=projection, tag="proj_")["logits"]
    return {"recon": recon, "proj": b.add("proj_norm", "l2norm", {}, [z])}


def head_token_linear(b: IRBuilder, x: str, classes: int, hidden: int) -> dict[str, str]:
    """Tokens: LN over the head's input channels → mean over tokens → Linear(C_in→classes)."""
    h = b.add("ln", "layernorm", {}, [x])
    h = b.add("pool", "token_pool", {"cls": False}, [h])
    return {"logits": _mlp(b, h, [b.shape(h)[0], classes], "")}


def head_token_mlp(b: IRBuilder, x: str, classes: int, hidden: int) -> dict[str, str]:
    """Tokens: LN → mean over tokens → Linear(C_in→hidden) → GELU → Linear(hidden→classes)."""
    h = b.add("ln", "layernorm", {}, [x])
    h = b.add("pool", "token_pool", {"cls": False}, [h])
    h = b.add("fc1", "linear", {"in": b.shape(h)[0], "out": hidden, "bias": True}, [h])
    h = b.add("gelu", "gelu", {}, [h])
    return {"logits": b.add("fc2", "linear", {"in": hidden, "out": classes, "bias": True}, [h])}


TOKEN_HEADS = ("token-linear", "token-mlp")
"""Heads that read token tensors (D×N); the others read feature maps or flat features."""
ANY_INPUT_HEADS = ("auglocal",)
"""Heads that read tokens, feature maps and flat features alike (their aux net follows the net's own units)."""


def check_head_input(kind: str, shape: list[int]) -> None:
    """Refuse a head that cannot read a tensor of per-sample ``shape``.

    Raises:
        PartitionError: a map head on tokens or a token head on a map, naming the heads that fit.
    """
    tokens = len(shape) == 2
    if kind in ANY_INPUT_HEADS:
        return
    if tokens and kind not in TOKEN_HEADS:
        raise PartitionError(f"the {kind} head needs a feature map or flat features, but this partition outputs "
                             f"tokens of shape {shape}; valid heads for tokens: {', '.join(TOKEN_HEADS)} (or auto)")
    if not tokens and kind in TOKEN_HEADS:
        raise PartitionError(f"the {kind} head reads tokens (D×N), but this partition outputs shape {shape}; "
                             "use 1c2f, linear, mlp-sr, predsim or infopro (or auto)")


def resolve_head_kind(kind: str, shape: list[int]) -> str:
    """``auto`` → token-linear for tokens, 1c2f otherwise; any other kind as given."""
    if kind != "auto":
        return kind
    return "token-linear" if len(shape) == 2 else "1c2f"


HEADS: dict[str, Callable[..., dict[str, str]]] = {
    "1c2f": head_1c2f,
    "linear": head_linear,
    "mlp-sr": head_mlp_sr,
    "predsim": head_predsim,
    "infopro": head_infopro,
    "token-linear": head_token_linear,
    "token-mlp": head_token_mlp,
    "auglocal": head_auglocal,
}
