"""Templates: built-in networks expanded into the same plain units a user could
write by hand under ``model.layers``."""

from __future__ import annotations

from pydantic import TypeAdapter

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


def expand_model(model: Model) -> list:
    """Return the model as a list of validated units, each with a unique name.

    Args:
        model: the ``model`` section of a spec.

    Returns:
        list of unit models (``Conv``, ``Block``, ...) with ``name`` set.
    """
    if model.template in RESNET_BLOCKS:
        raw = resnet_layers(RESNET_BLOCKS[model.template], model.width, model.num_classes)
        layers = _LAYERS.validate_python(raw)
    elif model.template == "vgg6a":
        layers = _LAYERS.validate_python(vgg6a_layers(model.width, model.dropout, model.num_classes))
    else:
        layers = [layer.model_copy() for layer in model.layers or []]
    for i, layer in enumerate(layers):
        if layer.name is None:
            layer.name = f"{layer.op}{i}"
    return layers
