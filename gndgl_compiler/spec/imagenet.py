"""torchvision's ResNets and ResNeXts as gndgl templates (DESIGN §2.2).

    resnet18 / resnet34                  basic blocks      [2,2,2,2] / [3,4,6,3]
    resnet50 / resnet101 / resnet152     bottlenecks       [3,4,6,3] / [3,4,23,3] / [3,8,36,3]
    resnext50_32x4d / resnext101_32x8d   bottlenecks, cardinality 32, base width 4 / 8
    wide_resnet50_2                      bottlenecks, base width 128

Units: ``stem`` (+ ``stem_bn``, ``stem_relu``, ``stem_pool``), ``s1.b0`` .. ``s4.b<n-1>`` (stage ``s<i>`` is
torchvision's ``layer<i>``), ``pool``, ``flatten``, ``fc``. With ``stem: cifar`` the stem is a 3×3 stride-1 conv
and there is no max-pool (the CIFAR ResNet-18 of much local-learning work).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SpecError
from .models import Model


@dataclass(frozen=True)
class ResNetConfig:
    """One torchvision ResNet: its unit kind, blocks per stage, cardinality and base width."""

    unit: str
    blocks: tuple[int, int, int, int]
    cardinality: int = 1
    base_width: int = 64


IMAGENET_CONFIGS: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig("block", (2, 2, 2, 2)),
    "resnet34": ResNetConfig("block", (3, 4, 6, 3)),
    "resnet50": ResNetConfig("bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetConfig("bottleneck", (3, 4, 23, 3)),
    "resnet152": ResNetConfig("bottleneck", (3, 8, 36, 3)),
    "resnext50_32x4d": ResNetConfig("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ResNetConfig("bottleneck", (3, 4, 23, 3), 32, 8),
    "wide_resnet50_2": ResNetConfig("bottleneck", (3, 4, 6, 3), 1, 128),
}
"""One entry per name of ``models.IMAGENET_TEMPLATES`` (checked by the tests)."""

MIN_INPUT = 32
"""Smallest input height / width of these templates (DESIGN §2.2)."""


def _w(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _check_input(model: Model) -> None:
    """Refuse an input smaller than :data:`MIN_INPUT` (the stem and four stages would shrink it to nothing)."""
    c, h, w = model.input_shape
    if h < MIN_INPUT or w < MIN_INPUT:
        raise SpecError(f"{model.template} needs an input of at least {MIN_INPUT}×{MIN_INPUT} pixels, got "
                        f"{c}×{h}×{w}; valid: input_shape [C, H, W] with H, W ≥ {MIN_INPUT} "
                        "(default [3, 224, 224])", path="model.input_shape")


def _stem(kind: str, out: int) -> list[dict]:
    if kind == "cifar":
        return [{"op": "conv", "name": "stem", "out": out, "kernel": 3},
                {"op": "bn", "name": "stem_bn"}, {"op": "relu", "name": "stem_relu"}]
    return [{"op": "conv", "name": "stem", "out": out, "kernel": 7, "stride": 2, "padding": 3},
            {"op": "bn", "name": "stem_bn"}, {"op": "relu", "name": "stem_relu"},
            {"op": "maxpool", "name": "stem_pool", "kernel": 3, "stride": 2, "padding": 1}]


def imagenet_layers(model: Model) -> list[dict]:
    """The units of a torchvision template (see the module docstring).

    Raises:
        SpecError: an input smaller than 32×32 (path ``model.input_shape``).
    """
    _check_input(model)
    cfg = IMAGENET_CONFIGS[model.template]
    layers = _stem(model.stem or "imagenet", _w(64, model.width))
    for s, n in enumerate(cfg.blocks, start=1):
        planes = _w(64 * 2 ** (s - 1), model.width)
        for j in range(n):
            stride = 2 if j == 0 and s > 1 else 1
            if cfg.unit == "block":
                layers.append({"op": "block", "name": f"s{s}.b{j}", "out": planes, "stride": stride})
            else:
                layers.append({"op": "bottleneck", "name": f"s{s}.b{j}", "planes": planes, "stride": stride,
                               "cardinality": cfg.cardinality, "base_width": cfg.base_width})
    layers += [{"op": "adaptive_avgpool", "name": "pool", "size": 1}, {"op": "flatten", "name": "flatten"},
               {"op": "linear", "name": "fc", "out": model.num_classes}]
    return layers
