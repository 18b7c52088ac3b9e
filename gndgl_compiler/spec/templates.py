"""Templates: built-in networks expanded into the same plain units a user could
write by hand under ``model.layers``."""

from __future__ import annotations

import math

from pydantic import TypeAdapter

from ..errors import SpecError
from .imagenet import IMAGENET_CONFIGS, imagenet_layers
from .models import Layer, Model

_LAYERS = TypeAdapter(list[Layer])

RESNET_BLOCKS = {"resnet20": 3, "resnet32": 5, "resnet56": 9, "resnet110": 18}


def _w(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def resnet_layers(blocks_per_stage: int, width: float, num_classes: int) -> list[dict]:
    """CIFAR ResNet (He et al. 2016): stem, 3 stages of basic blocks, avgpool, linear.

    Block ``j`` of stage ``s`` is named ``s{s}.b{j}`` (0-based ``j``); the stem is ``stem``.
    """
    w0, w1, w2, w3 = (_w(c, width) for c in (16, 16, 32, 64))
    layers: list[dict] = [
        {"op": "conv", "name": "stem", "out": w0, "kernel": 3},
        {"op": "bn", "name": "stem_bn"},
        {"op": "relu", "name": "stem_relu"},
    ]
    for s, (c, stride) in enumerate(((w1, 1), (w2, 2), (w3, 2)), start=1):
        for j in range(blocks_per_stage):
            layers.append({"op": "block", "name": f"s{s}.b{j}", "out": c, "stride": stride if j == 0 else 1})
    layers += [
        {"op": "adaptive_avgpool", "name": "pool", "size": 1},
        {"op": "flatten", "name": "flatten"},
        {"op": "linear", "name": "fc", "out": num_classes},
    ]
    return layers


def vgg6a_layers(width: float, dropout: float, num_classes: int) -> list[dict]:
    """VGG6a of Nøkland & Eidnes (2019): 4 convs (128, 256, 512, 512) and 2 linears (1024, classes)."""
    layers: list[dict] = []
    for i, (c, pool) in enumerate(((128, True), (256, True), (512, True), (512, False)), start=1):
        layers += [{"op": "conv", "name": f"conv{i}", "out": _w(c, width)}, {"op": "bn", "name": f"bn{i}"},
                   {"op": "relu", "name": f"relu{i}"}]
        if dropout > 0:
            layers.append({"op": "dropout", "name": f"drop{i}", "p": dropout})
        if pool:
            layers.append({"op": "maxpool", "name": f"pool{i}", "kernel": 2})
    layers += [{"op": "flatten", "name": "flatten"}, {"op": "linear", "name": "fc1", "out": _w(1024, width)},
               {"op": "bn", "name": "bn5"}, {"op": "relu", "name": "relu5"}]
    if dropout > 0:
        layers.append({"op": "dropout", "name": "drop5", "p": dropout})
    layers.append({"op": "linear", "name": "fc2", "out": num_classes})
    return layers


VIT_DEFAULTS = {
    "vit_tiny": {"dim": 64, "depth": 4, "heads": 4, "patch": 4, "mlp_ratio": 2.0},
    "vit_cifar": {"dim": 256, "depth": 8, "heads": 8, "patch": 4, "mlp_ratio": 2.0},
}
"""Template dimensions (D before the width multiplier, blocks, heads, patch size, MLP ratio)."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def vit_dims(model: Model) -> dict:
    """The resolved dimensions of a vit_* template: ``model.vit`` over the template defaults, D scaled by width.

    Raises:
        SpecError: (path ``model.vit.<field>``, no line) heads not dividing D, an MLP size that is not
            whole, or a patch size not dividing the input.
    """
    cfg = dict(VIT_DEFAULTS[model.template])
    given = model.vit.model_dump(exclude_none=True) if model.vit else {}
    cfg.update(given)
    dim = _w(cfg["dim"], model.width)
    where = "model.vit" if model.vit else "model"
    if dim % cfg["heads"]:
        valid = [h for h in _divisors(dim) if h <= 64]
        raise SpecError(f"{cfg['heads']} heads do not divide the embedding size D={dim}; valid heads: "
                        f"{', '.join(map(str, valid))}", path=f"{where}.heads" if "heads" in given else where)
    hidden = cfg["mlp_ratio"] * dim
    if abs(hidden - round(hidden)) > 1e-9:
        raise SpecError(f"mlp_ratio {cfg['mlp_ratio']} × D={dim} = {hidden} is not a whole number of hidden units",
                        path=f"{where}.mlp_ratio" if "mlp_ratio" in given else where)
    _, h, w = model.input_shape
    if h % cfg["patch"] or w % cfg["patch"]:
        raise SpecError(f"patch size {cfg['patch']} does not divide the {h}×{w} input; valid patch sizes: "
                        f"{', '.join(map(str, _divisors(math.gcd(h, w))))}",
                        path=f"{where}.patch" if "patch" in given else where)
    return {**cfg, "dim": dim}


def vit_layers(model: Model) -> list[dict]:
    """Pre-LN vision transformer: patch embedding + positions, L blocks, LN, token pool, linear.

    Units: ``patch`` (patch_embed), ``pos``, ``b0`` .. ``b{L-1}``, ``norm``, ``pool``, ``fc``; a unit is the
    patch embedding or one block, so depth cuts fall between blocks.
    """
    d = vit_dims(model)
    cls = bool(model.vit and model.vit.cls)
    layers: list[dict] = [{"op": "patch_embed", "name": "patch", "out": d["dim"], "patch": d["patch"]},
                          {"op": "pos_embed", "name": "pos", "cls": cls}]
    for i in range(d["depth"]):
        layers.append({"op": "transformer_block", "name": f"b{i}", "heads": d["heads"], "mlp_ratio": d["mlp_ratio"]})
    layers += [{"op": "layernorm", "name": "norm"}, {"op": "token_pool", "name": "pool", "cls": cls},
               {"op": "linear", "name": "fc", "out": model.num_classes}]
    return layers


def expand_model(model: Model) -> list:
    """Return the model as a list of validated units, each with a unique name.

    Args:
        model: the ``model`` section of a spec.

    Returns:
        list of unit models (``Conv``, ``Block``, ...) with ``name`` set.

    Raises:
        SpecError: impossible template dimensions (see :func:`vit_dims`) or an input too small for a
            torchvision template (:func:`~.imagenet.imagenet_layers`).
    """
    if model.template in IMAGENET_CONFIGS:
        layers = _LAYERS.validate_python(imagenet_layers(model))
    elif model.template in RESNET_BLOCKS:
        raw = resnet_layers(RESNET_BLOCKS[model.template], model.width, model.num_classes)
        layers = _LAYERS.validate_python(raw)
    elif model.template in VIT_DEFAULTS:
        layers = _LAYERS.validate_python(vit_layers(model))
    elif model.template == "vgg6a":
        layers = _LAYERS.validate_python(vgg6a_layers(model.width, model.dropout, model.num_classes))
    else:
        layers = [layer.model_copy() for layer in model.layers or []]
    for i, layer in enumerate(layers):
        if layer.name is None:
            layer.name = f"{layer.op}{i}"
    return layers
