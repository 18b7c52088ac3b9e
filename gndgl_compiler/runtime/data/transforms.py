"""Per-sample image transforms shared by the streamed and the in-memory path, every random
choice a function of (seed, epoch, step, position in the batch) — so of (seed, epoch, index).

    decoded uint8 C×H×W ──fit_channels──▶ ──train──▶ RandomResizedCrop(size, scale, ratio) + flip
                                          └─eval───▶ resize shorter side to eval_side + centre crop
                                          └─no RRC─▶ zero-pad to the model's H×W (CIFAR: then pad-crop-flip
                                                      on the batch, ``batches.augment``)

The crop box follows torchvision's ``RandomResizedCrop.get_params`` (ten tries, then a centre
crop), fed by uniforms drawn per step from a generator seeded by (seed, epoch, step).
Resizing is bilinear with antialiasing on uint8 (torchvision's tensor resize).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import DataError
from .batches import stable_seed

TRIES = 10


@dataclass(frozen=True)
class CropPlan:
    """What the per-sample transform does: RandomResizedCrop settings (None: pad to shape) and the output shape."""

    shape: tuple[int, int, int]
    rrc: tuple[int, tuple[float, float], tuple[float, float], int] | None = None
    """(size, scale, ratio, eval_side) or None."""
    flip: bool = False


def rrc_draws(n: int, *, seed: int, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample uniforms (n×TRIES×4, float64) for the crop tries and flip coins (n, bool) of one step."""
    g = torch.Generator().manual_seed(stable_seed("rrc", seed, epoch, step))
    return torch.rand(n, TRIES, 4, generator=g, dtype=torch.float64), torch.rand(n, generator=g) < 0.5


def rrc_box(h: int, w: int, u: torch.Tensor, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the crop of an h×w image from its uniforms ``u`` (TRIES×4)."""
    area, (llo, lhi) = h * w, (math.log(ratio[0]), math.log(ratio[1]))
    for a, b, c, d in u.tolist():
        target = area * (scale[0] + a * (scale[1] - scale[0]))
        aspect = math.exp(llo + b * (lhi - llo))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(c * (h - ch + 1)), int(d * (w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a uint8 C×H×W image to h×w (unchanged when already that size)."""
    if tuple(img.shape[1:]) == (h, w):
        return img
    return F.interpolate(img[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


def fit_channels(img: torch.Tensor, c: int, where: str) -> torch.Tensor:
    """Gray images join RGB ones as RGB (expanded); more channels than the model's is an error."""
    if img.shape[0] == c:
        return img
    if img.shape[0] == 1:
        return img.expand(c, -1, -1)
    raise DataError(f"image {where} has {img.shape[0]} channels but the model reads {c}; convert it or set the "
                    "model's input_shape")


def pad_to(img: torch.Tensor, h: int, w: int, where: str) -> torch.Tensor:
    """Zero-pad a C×h0×w0 image centred to h×w (as the in-memory path's ``adapt_shape``)."""
    h0, w0 = img.shape[1:]
    if (h0, w0) == (h, w):
        return img
    if h0 > h or w0 > w:
        raise DataError(f"image {where} is {h0}x{w0}, larger than the model input {h}x{w}; set "
                        "train.augment.random_resized_crop (crops and resizes any size) or resize the images")
    return F.pad(img, ((w - w0) // 2, w - w0 - (w - w0) // 2, (h - h0) // 2, h - h0 - (h - h0) // 2))


def eval_crop(img: torch.Tensor, side: int, size: int) -> torch.Tensor:
    """Resize the shorter side to ``side`` (aspect kept, as torchvision's Resize(int)) and centre-crop size×size."""
    h, w = img.shape[1:]
    nh, nw = (side, int(side * w / h)) if h <= w else (int(side * h / w), side)
    img = resize(img, nh, nw)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return img[:, top:top + size, left:left + size]


def train_crop(img: torch.Tensor, u: torch.Tensor, flip: bool, plan: CropPlan) -> torch.Tensor:
    """RandomResizedCrop of one image from its uniforms, then the flip."""
    size, scale, ratio, _ = plan.rrc
    top, left, ch, cw = rrc_box(img.shape[1], img.shape[2], u, scale, ratio)
    out = resize(img[:, top:top + ch, left:left + cw], size, size)
    return out.flip(-1) if flip and plan.flip else out


def transform_batch(imgs: list[torch.Tensor | None], names: list[str], plan: CropPlan, *, train: bool, seed: int,
                    epoch: int, step: int) -> torch.Tensor:
    """The uint8 N×C×H×W batch of decoded images (a None image becomes zeros: skipped, dropped later)."""
    c, h, w = plan.shape
    draws = rrc_draws(len(imgs), seed=seed, epoch=epoch, step=step) if plan.rrc and train else None
    out = torch.zeros(len(imgs), c, h, w, dtype=torch.uint8)
    for k, (img, name) in enumerate(zip(imgs, names)):
        if img is None:
            continue
        img = fit_channels(img, c, name)
        if plan.rrc is None:
            out[k] = pad_to(img, h, w, name)
        elif draws is not None:
            out[k] = train_crop(img, draws[0][k], bool(draws[1][k]), plan)
        else:
            out[k] = eval_crop(img, plan.rrc[3], plan.rrc[0])
    return out


def crop_plan(augment, shape: tuple[int, int, int]) -> CropPlan:
    """The :class:`CropPlan` of the recipe's ``augment`` for a model reading ``shape`` (C, H, W)."""
    rrc = getattr(augment, "random_resized_crop", None) if augment is not None else None
    if rrc is None:
        return CropPlan(tuple(shape))
    if tuple(shape[1:]) != (rrc.size, rrc.size):
        raise DataError(f"train.augment.random_resized_crop.size is {rrc.size} but the model reads "
                        f"{shape[1]}x{shape[2]} images; make them agree (size: {shape[1]} or the model's input_shape)")
    return CropPlan(tuple(shape), (rrc.size, tuple(rrc.scale), tuple(rrc.ratio), rrc.eval_side), bool(augment.flip))
