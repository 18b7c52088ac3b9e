"""Pydantic models of a gndgl spec. Every field carries a one-line description
that ends up in the JSON Schema (``gndgl schema``)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from typing import Any

from .setting import Setting
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_serializer, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


Weight = Annotated[float, Field(ge=0, le=1000)]
Beta = Annotated[float, Field(ge=0, lt=1)]
Epoch = Annotated[float, Field(ge=0, le=100_000)]
LR = Annotated[float, Field(ge=0, le=100)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_default=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------- layers


class _Unit(_Strict):
    name: str | None = Field(None, pattern=NAME_PATTERN,
                             description="Unit name (cut points may refer to it); default '<op><index>'.")


class Conv(_Unit):
    op: Literal["conv"] = Field(description="2-D convolution.")
    out: int = Field(ge=1, le=65536, description="Output channels.")
    kernel: int = Field(3, ge=1, le=15, description="Square kernel size.")
    stride: int = Field(1, ge=1, le=8, description="Stride.")
    padding: int | None = Field(None, ge=0, le=15, description="Zero padding; default kernel // 2.")
    bias: bool = Field(False, description="Add a bias term.")


class BN(_Unit):
    op: Literal["bn"] = Field(description="Batch normalisation (1-d or 2-d by input rank).")


class ReLU(_Unit):
    op: Literal["relu"] = Field(description="ReLU activation.")


class MaxPool(_Unit):
    op: Literal["maxpool"] = Field(description="Max pooling.")
    kernel: int = Field(2, ge=1, le=16, description="Window size.")
    stride: int | None = Field(None, ge=1, le=16, description="Stride; default = kernel.")
    padding: int = Field(0, ge=0, le=8, description="Implicit -inf padding on each side (at most kernel // 2).")


class AvgPool(_Unit):
    op: Literal["avgpool"] = Field(description="Average pooling.")
    kernel: int = Field(2, ge=1, le=64, description="Window size.")
    stride: int | None = Field(None, ge=1, le=64, description="Stride; default = kernel.")


class AdaptiveAvgPool(_Unit):
    op: Literal["adaptive_avgpool"] = Field(description="Adaptive average pooling to a fixed size (1 = global).")
    size: int = Field(1, ge=1, le=64, description="Output height and width.")


class Flatten(_Unit):
    op: Literal["flatten"] = Field(description="Flatten C×H×W to features.")


class Linear(_Unit):
    op: Literal["linear"] = Field(description="Fully connected layer.")
    out: int = Field(ge=1, le=1_000_000, description="Output features.")
    bias: bool = Field(True, description="Add a bias term.")


class Dropout(_Unit):
    op: Literal["dropout"] = Field(description="Dropout.")
    p: float = Field(0.0, ge=0.0, lt=1.0, description="Drop probability.")


class Block(_Unit):
    op: Literal["block"] = Field(description="Basic residual block: conv-bn-relu-conv-bn + shortcut, relu.")
    out: int = Field(ge=1, le=65536, description="Output channels.")
    stride: int = Field(1, ge=1, le=4, description="Stride of the first conv (and the shortcut).")


class Bottleneck(_Unit):
    op: Literal["bottleneck"] = Field(description="torchvision's bottleneck (v1.5): 1×1, 3×3 (stride, groups = "
                                      "cardinality), 1×1 to 4·planes, + shortcut, relu.")
    planes: int = Field(ge=1, le=65536, description="Planes p: the block outputs 4·p channels.")
    stride: int = Field(1, ge=1, le=4, description="Stride of the 3×3 conv (and the shortcut).")
    cardinality: int = Field(1, ge=1, le=4096,
                             description="Groups c of the 3×3 conv (ResNeXt); a width cut's G must divide it.")
    base_width: int = Field(64, ge=1, le=65536, description="Base width b: the inner width is floor(p·b/64)·c.")


class PatchEmbed(_Unit):
    op: Literal["patch_embed"] = Field(description="Patch embedding: conv p×p with stride p to D channels, then N "
                                       "tokens.")
    out: int = Field(ge=1, le=65536, description="Embedding size D (channels of the residual stream).")
    patch: int = Field(4, ge=1, le=64, description="Patch size p (must divide the input height and width).")
    bias: bool = Field(True, description="Add a bias term.")


class PosEmbed(_Unit):
    op: Literal["pos_embed"] = Field(description="Learned positional embedding added to the tokens.")
    cls: bool = Field(False, description="Prepend a learned CLS token first (read by 'token_pool' with cls: true).")


class LayerNorm(_Unit):
    op: Literal["layernorm"] = Field(description="LayerNorm over the channels of tokens (or flat features).")


class GELU(_Unit):
    op: Literal["gelu"] = Field(description="GELU activation.")


class SiLU(_Unit):
    op: Literal["silu"] = Field(description="SiLU activation.")


class Attention(_Unit):
    op: Literal["attention"] = Field(description="Multi-head self-attention (QKV, scaled dot product, projection); no "
                                     "residual.")
    heads: int = Field(4, ge=1, le=4096, description="Number of heads H (must divide the embedding size).")
    bias: bool = Field(True, description="Biases of the QKV and output projections.")


class MLP(_Unit):
    op: Literal["mlp"] = Field(description="Token MLP: Linear(D→ratio·D) → activation → Linear(→D); no residual.")
    ratio: float = Field(2.0, gt=0, le=64,
                         description="Hidden size as a multiple of the embedding size (ratio·D must be whole).")
    act: Literal["gelu", "silu"] = Field("gelu", description="Hidden activation.")


class TransformerBlock(_Unit):
    op: Literal["transformer_block"] = Field(description="Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)).")
    heads: int = Field(4, ge=1, le=4096, description="Attention heads H (must divide the embedding size).")
    mlp_ratio: float = Field(2.0, gt=0, le=64, description="MLP hidden size as a multiple of the embedding size.")
    act: Literal["gelu", "silu"] = Field("gelu", description="MLP activation.")


class TokenPool(_Unit):
    op: Literal["token_pool"] = Field(description="Tokens to features: mean over tokens, or the CLS token.")
    cls: bool = Field(False, description="Take the CLS token (needs 'pos_embed' with cls: true) instead of the mean.")


Layer = Annotated[
    Union[Conv, BN, ReLU, MaxPool, AvgPool, AdaptiveAvgPool, Flatten, Linear, Dropout, Block, Bottleneck, PatchEmbed,
          PosEmbed, LayerNorm, GELU, SiLU, Attention, MLP, TransformerBlock, TokenPool],
    Field(discriminator="op"),
]
LAYER_OPS = ("conv", "bn", "relu", "maxpool", "avgpool", "adaptive_avgpool", "flatten", "linear", "dropout", "block",
             "bottleneck", "patch_embed", "pos_embed", "layernorm", "gelu", "silu", "attention", "mlp",
             "transformer_block", "token_pool")


class ViT(_Strict):
    """Dimensions of the vit_tiny / vit_cifar templates; each unset field keeps the template's value."""

    dim: int | None = Field(None, ge=1, le=65536,
                            description="Embedding size D before the width multiplier (vit_tiny 64, vit_cifar 256).")
    depth: int | None = Field(None, ge=1, le=1024,
                              description="Number of transformer blocks L (vit_tiny 4, vit_cifar 8).")
    heads: int | None = Field(None, ge=1, le=4096,
                              description="Attention heads H; must divide D (vit_tiny 4, vit_cifar 8).")
    patch: int | None = Field(None, ge=1, le=64, description="Patch size p; must divide the input size (4 for both).")
    mlp_ratio: float | None = Field(None, gt=0, le=64, description="MLP hidden size as a multiple of D (2 for both).")
    cls: bool = Field(False, description="Classify from a CLS token instead of the mean over tokens.")


IMAGENET_TEMPLATES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                      "resnext101_32x8d", "wide_resnet50_2")
"""torchvision's ResNets / ResNeXts (DESIGN §2.2); their default input is 3×224×224."""


class Model(_Strict):
    template: Literal["resnet20", "resnet32", "resnet56", "resnet110", "vgg6a", "vit_tiny", "vit_cifar", "resnet18",
                      "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
                      "wide_resnet50_2"] | None = Field(
        None, description="Built-in network; expands to plain layers. Give either this or 'layers'.")
    stem: Literal["imagenet", "cifar"] | None = Field(None, description="Stem of the torchvision templates (resnet18 "
                                                      ".. wide_resnet50_2): 'imagenet' (7×7/2 conv, BN, ReLU, 3×3/2 "
                                                      "max-pool; the default) or 'cifar' (3×3/1 conv, no pool).")
    width: float = Field(1.0, gt=0, le=16,
                         description="Template width multiplier (2 = '2×ResNet-32'; scales D of a ViT).")
    vit: ViT | None = Field(None,
                            description="vit_tiny / vit_cifar dimensions (D, depth, heads, patch, MLP ratio, CLS).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Template dropout after each hidden layer (vgg6a).")
    layers: list[Layer] | None = Field(None, min_length=1, max_length=4096, description="Explicit list of units.")
    input_shape: tuple[int, int, int] = Field((3, 32, 32), description="Input C, H, W.")
    num_classes: int = Field(10, ge=2, le=100_000, description="Number of classes of the task.")

    @field_validator("input_shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(d < 1 or d > 4096 for d in v):
            raise ValueError(f"every entry of input_shape must be in 1..4096, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "Model":
        if (self.template is None) == (self.layers is None):
            raise ValueError("give exactly one of 'template' (resnet32, vgg6a, ...) or 'layers' (a list of units)")
        if self.vit is not None and not (self.template or "").startswith("vit_"):
            raise ValueError("'vit' sets the dimensions of the vit_tiny / vit_cifar templates; "
                             f"use it with one of those (template is {self.template!r})")
        if self.stem is not None and self.template not in IMAGENET_TEMPLATES:
            raise ValueError(f"'stem' chooses the stem of the torchvision templates ({', '.join(IMAGENET_TEMPLATES)}); "
                             f"template is {self.template!r}")
        if self.template in IMAGENET_TEMPLATES and "input_shape" not in self.model_fields_set:
            self.input_shape = (3, 224, 224)
        return self


# ----------------------------------------------------------------------------- cuts

CutPoint = Union[int, str]


class Cuts(_Strict):
    depth: int | list[CutPoint] = Field(1, description="K modules (int; ResNets use the paper's table) or explicit cut "
                                        "points: cut after these units (name or index).")
    width: int | list[int] = Field(1, description="Groups per module: one G for all, or one value per module.")
    split: Literal["equal", "balanced"] = Field("equal", description="'equal' needs G to divide every channel count; "
                                                "'balanced' allows sizes differing by one.")
    balance: Literal["macs", "memory"] | None = Field(
        None, description="How an integer K cuts: 'macs' (the default: ResNet-32 uses the paper's table, other nets "
        "contiguous modules minimising the largest forward MACs) or 'memory' (minimising the largest activation bytes "
        "saved for backward, the memory model). Not with explicit cut points.")

    @field_validator("depth", "width", mode="before")
    @classmethod
    def _no_booleans(cls, v, info):
        # Before pydantic's lax coercion turns `true` into 1.
        for x in (v if isinstance(v, list) else [v]):
            if isinstance(x, bool):
                what = "an integer K or a list of cut points" if info.field_name == "depth" else \
                    "an integer G or a list of integers (one per module)"
                raise ValueError(f"{info.field_name} must be {what}, not a boolean")
        return v

    @field_validator("depth")
    @classmethod
    def _depth(cls, v):
        if isinstance(v, bool):
            raise ValueError("depth must be an integer K or a list of cut points, not a boolean")
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError(f"depth K must be between 1 and 1024, got {v}")
        if isinstance(v, list):
            if len(v) > 1024:
                raise ValueError("at most 1024 cut points")
            seen = set()
            for c in v:
                if isinstance(c, bool):
                    raise ValueError("a cut point is a unit name or index, not a boolean")
                if c in seen:
                    raise ValueError(f"cut point {c!r} is given twice; list each cut once")
                seen.add(c)
        return v

    @model_serializer(mode="wrap")
    def _unset_balance(self, handler):
        # an unset balance stays out of the normalised spec (spec.json of a spec without it is unchanged)
        out = handler(self)
        if self.balance is None and isinstance(out, dict):
            out.pop("balance", None)
        return out

    @field_validator("balance")
    @classmethod
    def _balance(cls, v, info):
        if v is not None and isinstance(info.data.get("depth"), list):
            raise ValueError(f"balance: {v} balances an integer K (depth: K); depth is a list of cut points, "
                             "which fixes the cuts: remove balance, or give depth as an integer")
        return v

    @field_validator("width")
    @classmethod
    def _width(cls, v):
        vals = [v] if isinstance(v, int) else v
        if isinstance(v, list) and not 1 <= len(v) <= 1024:
            raise ValueError("width list must have one entry per module (1..1024 entries)")
        for g in vals:
            if isinstance(g, bool) or not 1 <= g <= 4096:
                raise ValueError(f"every G must be an integer in 1..4096, got {g!r}")
        return v


# ----------------------------------------------------------------------------- local learning

HeadKind = Literal["auto", "1c2f", "linear", "mlp-sr", "predsim", "infopro", "token-linear", "token-mlp", "auglocal"]
AUGLOCAL_FIELDS = ("depth", "pyramid")
"""Head fields that only ``kind: auglocal`` reads (left out of the normalised spec when unset)."""


class Head(_Strict):
    kind: HeadKind = Field("auto", description="Auxiliary head: 1c2f, linear, mlp-sr, predsim, infopro (maps), "
                           "token-linear, token-mlp (tokens), or 'auto' (token-linear on tokens, else 1c2f).")
    hidden: int | None = Field(None, ge=1, le=65536, description="Hidden width F of 1c2f / mlp-sr heads (default 128 × "
                               "width) and token-mlp heads (default 2 × input channels).")
    beta: float = Field(0.99, ge=0, le=1, description="predsim: weight of the similarity-matching term.")
    variant: Literal["contrast", "softmax"] = Field("contrast", description="infopro: task term, supervised "
                                                    "contrastive or softmax.")
    recon_weight: tuple[Weight, Weight] = Field((5.0, 0.0),
                                                description="infopro: λ_recon at the first and last local module.")
    task_weight: tuple[Weight, Weight] = Field((0.0, 2.0),
                                               description="infopro: λ_task at the first and last local module.")
    temperature: float = Field(0.07, gt=0, le=100, description="infopro contrast: temperature of the contrastive loss.")
    projection: int = Field(128, ge=1, le=65536, description="infopro contrast: projection dimension.")
    depth: int | None = Field(None, ge=1, le=1024, strict=True, description="auglocal: aux-net depth d (the first "
                              "module's number of sampled later units; needed with kind auglocal).")
    pyramid: float | None = Field(None, ge=0, le=1, description="auglocal: pyramidal decay τ of the depth over the "
                                  "modules (0 = every module d units; default 0).")

    @model_serializer(mode="wrap")
    def _unset_auglocal(self, handler):
        # unset auglocal fields stay out of the normalised spec (spec.json of other heads is unchanged)
        out = handler(self)
        if isinstance(out, dict):
            for key in AUGLOCAL_FIELDS:
                if getattr(self, key) is None:
                    out.pop(key, None)
        return out

    @model_validator(mode="after")
    def _auglocal_fields(self):
        given = [k for k in AUGLOCAL_FIELDS if getattr(self, k) is not None]
        if self.kind != "auglocal" and given:
            raise ValueError(f"{', '.join(given)} configure kind: auglocal only (this head is kind: {self.kind}); "
                             "remove them or set kind: auglocal")
        if self.kind == "auglocal" and self.depth is None:
            raise ValueError("kind: auglocal needs depth: d (an integer >= 1, e.g. 2; the CIFAR settings use d = 2 "
                             "for ResNet-32 and 3 for ResNet-110)")
        return self


class Diversity(_Strict):
    weight: float = Field(0.0, ge=0, le=1000, description="Weight w of the diversity penalty (0 = off).")
    temperature: float = Field(3.0, gt=0, le=1000, description="Softmax temperature T of the penalty.")


class FinalHead(_Strict):
    kind: Literal["auto", "1c2f", "linear", "model"] = Field("auto", description="Final head: 1c2f-shaped, "
                                                             "avgpool+linear, the model's own classifier units, or "
                                                             "'auto' (model when joint or end-to-end, else 1c2f).")
    mode: Literal["separate", "joint"] = Field("separate", description="'separate': its own partition on the detached "
                                               "last map; 'joint': closes the last module.")
    hidden: int | None = Field(None, ge=1, le=65536,
                               description="Hidden width of a 1c2f final head; default 128 × width.")


class Man(_Strict):
    momentum: float = Field(0.995, ge=0, lt=1, description="MAN: EMA momentum m (θ_EMA ← m·θ_EMA + (1−m)·θ_U), "
                            "0 ≤ m < 1.")
    mix: Literal["sum", "learned"] = Field("sum", description="'sum': y = LB(h) + EMA(h) (MAN); 'learned': "
                                           "y = s·LB(h) + (2−s)·EMA(h), one learnable s per module, init 1 (MAN++).")


class Local(_Strict):
    head: Head = Field(default_factory=Head, description="Auxiliary head of every partition.")
    share_ratio: float = Field(0.0, ge=0, le=1, description="Stop-gradient sharing r: fraction of each sibling's "
                               "channels its aux head sees.")
    diversity: Diversity = Field(default_factory=Diversity, description="Diversity penalty between sibling groups.")
    final_head: FinalHead = Field(default_factory=FinalHead, description="The classifier at the end of the network.")
    schedule: Literal["parallel", "sequential"] = Field("parallel", description="'parallel' (DGL) or 'sequential' "
                                                        "greedy layerwise training.")
    man: Man | None = Field(None, description="MAN / MAN++ (DESIGN §2.3): the aux net of module k < K follows the "
                            "first unit of module k+1 (a trainable copy plus its EMA), then the head.")

    @model_serializer(mode="wrap")
    def _unset_man(self, handler):
        # an unset man stays out of the normalised spec (spec.json of a spec without it is unchanged)
        out = handler(self)
        if self.man is None and isinstance(out, dict):
            out.pop("man", None)
        return out


# ----------------------------------------------------------------------------- placement


class Placement(_Strict):
    devices: str | list[str] = Field("cpu", description="Devices partitions are balanced over: 'cpu', 'cuda', 'cuda:N' "
                                     "or a list.")
    workers: int | None = Field(None, ge=1, le=4096,
                                description="Number of distributed workers (ranks) to balance over instead of devices.")
    replicas: int = Field(1, ge=1, le=4096, description="Data-parallel copies of the workers' pipeline (R·N processes; "
                          "replica r trains rows r::R of every global batch, gradients averaged per partition).")

    @field_validator("devices")
    @classmethod
    def _devices(cls, v):
        vals = [v] if isinstance(v, str) else v
        if not vals:
            raise ValueError("give at least one device")
        import re
        for d in vals:
            if not re.fullmatch(r"cpu|cuda(:\d{1,3})?|mps", d):
                raise ValueError(f"unknown device {d!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return v

    def device_list(self) -> list[str]:
        """The devices as a list."""
        return [self.devices] if isinstance(self.devices, str) else list(self.devices)

    @model_serializer(mode="wrap")
    def _unset_replicas(self, handler):
        # one replica (the default) stays out of the normalised spec (spec.json without it is unchanged)
        out = handler(self)
        if self.replicas == 1 and isinstance(out, dict):
            out.pop("replicas", None)
        return out


# ----------------------------------------------------------------------------- training


class Optimizer(_Strict):
    kind: Literal["sgd", "adam", "adamw"] = Field("sgd", description="Optimizer of every partition.")
    lr: float = Field(0.1, gt=0, le=100, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(True, description="SGD Nesterov momentum.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="L2 weight decay (decoupled for adamw).")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="Adam betas.")

    @model_validator(mode="after")
    def _nesterov(self) -> "Optimizer":
        if self.kind == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("Nesterov needs momentum > 0; set momentum or nesterov: false")
        return self


class Schedule(_Strict):
    kind: Literal["cosine", "multistep", "constant"] = Field("cosine", description="LR schedule, stepped every batch.")
    warmup_epochs: float = Field(0.0, ge=0, le=10000, description="Linear warm-up length in epochs.")
    warmup_start_lr: float = Field(0.0, ge=0, le=100, description="LR at the start of the warm-up.")
    min_lr: float = Field(0.0, ge=0, le=100, description="cosine: final LR.")
    milestones: list[Epoch] = Field(default_factory=list, max_length=10000,
                                    description="multistep: epochs at which the LR drops.")
    gamma: float = Field(0.1, gt=0, le=1, description="multistep: factor per milestone (unless 'values' is given).")
    values: list[LR] | None = Field(None, max_length=10000, description="multistep: explicit LR after each milestone.")

    @model_validator(mode="after")
    def _multistep(self) -> "Schedule":
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"milestones must increase strictly, got {self.milestones}")
        if self.values is not None and len(self.values) != len(self.milestones):
            raise ValueError(f"'values' needs one LR per milestone ({len(self.milestones)}), got {len(self.values)}")
        return self


class RandomResizedCrop(_Strict):
    size: int = Field(224, ge=1, le=4096, description="Side of the training crop and of the evaluation centre crop.")
    scale: tuple[float, float] = Field((0.08, 1.0), description="Range of the crop's area, a fraction of the image's.")
    ratio: tuple[float, float] = Field((0.75, 4 / 3), description="Range of the crop's aspect ratio (width/height).")
    eval_resize: int | None = Field(None, ge=1, le=8192, description="Evaluation: shorter side resized to this, then "
                                    "a centre crop of 'size' (default size/0.875: 256 for 224).")

    @model_validator(mode="after")
    def _ranges(self) -> "RandomResizedCrop":
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must be [lo, hi] with 0 < lo <= hi, got {list(self.ratio)}")
        if self.eval_resize is not None and self.eval_resize < self.size:
            raise ValueError(f"eval_resize {self.eval_resize} is smaller than the crop size {self.size}; "
                             f"give eval_resize >= {self.size} or leave it out")
        return self

    @property
    def eval_side(self) -> int:
        """The shorter side of an evaluation image before its centre crop."""
        return self.eval_resize or round(self.size / 0.875)


class Augment(_Strict):
    crop_pad: int = Field(4, ge=0, le=64, description="Random crop after zero padding by this many pixels (0 = off).")
    flip: bool = Field(True, description="Random horizontal flip.")
    random_resized_crop: RandomResizedCrop | None = Field(None, description="ImageNet's training crop (replaces "
                                                          "crop_pad); evaluation resizes and centre-crops.")

    @model_validator(mode="after")
    def _one_crop(self) -> "Augment":
        if self.random_resized_crop is not None:
            if "crop_pad" in self.model_fields_set and self.crop_pad:
                raise ValueError("crop_pad and random_resized_crop are two crops; keep one (crop_pad: 0, or remove "
                                 "random_resized_crop)")
            self.crop_pad = 0
        return self

    @model_serializer(mode="wrap")
    def _unset_rrc(self, handler):
        # an unset random_resized_crop stays out of the normalised spec (spec.json without it is unchanged)
        out = handler(self)
        if self.random_resized_crop is None and isinstance(out, dict):
            out.pop("random_resized_crop", None)
        return out


class DataFeed(_Strict):
    mode: Literal["auto", "memory", "stream"] = Field("auto", description="memory: decode once into a tensor; stream: "
                                                      "worker processes decode each batch; auto: memory where it fits.")
    workers: int | None = Field(None, ge=0, le=256, description="Decoding worker processes (default: CPUs - 1, at most "
                                "8; 0 = in the training process).")
    prefetch: int = Field(2, ge=1, le=64, description="Batches each worker prepares ahead (the queue's bound).")
    on_bad_image: Literal["fail", "skip"] = Field("fail", description="An unreadable image: stop with its path (fail) "
                                                  "or log it, leave it out of its batch and count it (skip).")


class Train(_Strict):
    # Each field declares, beside its type, default and description, a Setting (spec/setting.py): its
    # TrainOptions field and flag, recipe or execution, and its resume rule. (No docstring: the schema is unchanged.)

    dataset: Annotated[str, Setting(
        "recipe", "refused", "--dataset", "Override train.dataset (cifar10, fashion-mnist, synthetic, a "
        "folder/.tar.gz, ...).", "NAME|PATH")] = Field(
        "cifar10", min_length=1, max_length=4096, description="cifar10, cifar100, mnist, fashion-mnist, synthetic, "
        "or a path to an image folder / .tar.gz.")
    data_root: Annotated[str | None, Setting("execution", "applies", "--data-root", "Where data set files live.",
                                             "DIR")] = Field(
        None, max_length=4096, description="Where torchvision / IDX files live (default $GNDGL_DATA).")
    batch_size: Annotated[int, Setting("recipe", "refused", "--batch-size", "Override train.batch_size.", "N")] = Field(
        128, ge=1, le=1_000_000, description="Mini-batch size.")
    epochs: Annotated[int, Setting("recipe", "extends", "--epochs", "Override train.epochs (the warm-up and LR "
                                   "milestones scale with it).", "N")] = Field(
        1, ge=1, le=100_000, description="Training epochs.")
    optimizer: Annotated[Optimizer, Setting("recipe", "refused", option=False)] = Field(
        default_factory=Optimizer, description="Optimizer settings (one optimizer per partition).")
    schedule: Annotated[Schedule, Setting("recipe", "refused", option=False)] = Field(
        default_factory=Schedule, description="Learning-rate schedule.")
    augment: Annotated[Augment | None, Setting("recipe", "refused", option=False)] = Field(
        default_factory=Augment, description="Data augmentation; null for none.")
    data: Annotated[DataFeed | None, Setting("execution", "refused", option=False, missing_ok=True)] = Field(
        None, description="How the data set is read: in memory or streamed by workers.")
    seed: Annotated[int, Setting("recipe", "refused", "--seed", "Override train.seed.", "N")] = Field(
        0, ge=0, le=2**31 - 1, description="Seed of weights, batch order and augmentation.")
    init: Annotated[str | None, Setting("compile", "refused", option=False)] = Field(
        None, min_length=1, max_length=4096, description="Initial weights: a state-dict file (.pt / .pth / "
        ".safetensors) with torchvision's names (a torchvision template's) or the op graph's (e.g. "
        "'s1.b0.conv1.weight'); each partition takes its slice. Loaded at compile time.")
    checkpoint_every: Annotated[int, Setting("execution", "applies", "--checkpoint-every",
                                             "Also checkpoint every N steps.", "N")] = Field(
        0, ge=0, description="Also checkpoint every N steps (0 = only each epoch).")
    log_every: Annotated[int, Setting("execution", "applies", "--log-every", "Log every N steps.", "N")] = Field(
        50, ge=1, description="Log training metrics every N steps.")
    amp: Annotated[Literal["auto", "bf16", "off"], Setting(
        "execution", "refused", help="Override train.amp: auto, bf16 or off (bf16 autocast; API only).")] = Field(
        "auto", description="bf16 autocast: 'auto' = on for CUDA.")
    channels_last: Annotated[Literal["auto", "on", "off"], Setting(
        "execution", "refused", help="Override train.channels_last: auto, on or off (API only).")] = Field(
        "auto", description="channels_last memory format: 'auto' = on for CUDA.")
    compile: Annotated[Literal["off", "regional"], Setting(
        "execution", "applies", "--compile", "torch.compile each sibling-fused module's program: off or regional "
        "(default from the spec, train.compile).", "off|regional")] = Field(
        "off", description="torch.compile each sibling-fused module's program ('regional'); off by default "
        "(measured: see README).")
    cuda_graphs: Annotated[Literal["auto", "on", "off"], Setting(
        "execution", "applies", "--cuda-graphs", "Capture each step as one CUDA graph: auto, on or off (default "
        "from the spec, train.cuda_graphs).", "auto|on|off")] = Field(
        "off", description="Capture the whole step as one CUDA graph: 'auto' = when every partition of the process "
        "is on CUDA and the step is capturable, 'on' = required (exit 2 if not), 'off' (default until checked on a "
        "GPU).")
    fused: Annotated[bool, Setting("execution", "refused", "--fused/--no-fused",
                                   "Per-device fused step (default from the spec).")] = Field(
        True, description="Fuse the partitions on one device into one step (same math, fewer kernels).")
    fuse_siblings: Annotated[bool, Setting(
        "execution", "applies", "--fuse-siblings/--no-fuse-siblings", "Run each module's sibling partitions on one "
        "device as one program (default from the spec).", missing_ok=True)] = Field(
        True, description="With fused: run the G partitions of a module that share a device as one program (dense "
        "first conv + grouped convs, batched heads and losses; same math up to float rounding). Per-partition "
        "parameters, checkpoints and optimizer state are unchanged.")
    sync_bn: Annotated[bool, Setting("recipe", "refused", "--sync-bn/--no-sync-bn", "Synchronise BatchNorm "
                                     "statistics over the replicas (default from the spec).", missing_ok=True)] = Field(
        False, description="With data-parallel replicas: each BatchNorm normalises with the statistics of the global "
        "batch (all replicas' rows), as one process with the global batch would; off: per-replica statistics, as "
        "DDP. Any backend (gloo/CPU too). Nothing to synchronise with one replica.")

    @model_serializer(mode="wrap")
    def _unset_data(self, handler):
        # an unset data section stays out of the normalised spec (spec.json without it is unchanged)
        out = handler(self)
        if self.data is None and isinstance(out, dict):
            out.pop("data", None)
        if not self.sync_bn and isinstance(out, dict):
            out.pop("sync_bn", None)
        return out


class Spec(_Strict):
    """A gndgl spec: the network, how to cut it, and how to train it."""

    name: str = Field(pattern=NAME_PATTERN, description="Name of the spec (letters, digits, '_', '-', '.').")
    description: str | None = Field(None, max_length=10000, description="Free text: what the spec reproduces.")
    model: Model = Field(description="The network: a template or explicit layers.")
    cuts: Cuts = Field(default_factory=Cuts, description="Depth cuts K and width cuts G.")
    local: Local = Field(default_factory=Local,
                         description="Local-learning method: heads, sharing, diversity, final head, schedule.")
    placement: Placement = Field(default_factory=Placement, description="Where partitions run.")
    train: Train = Field(default_factory=Train, description="Training recipe (used by 'gndgl train').")
    _lines: Any = PrivateAttr(None)
    _file: Any = PrivateAttr(None)
