"""The embedded segmentation set: scikit-learn's handwritten digits drawn on textured, noisy
backgrounds, with the exact class of every pixel (0 background, 1 + the digit), generated from a
seed, so the linear segmentation probe (``ssl_kit.evaluation.segmentation``) needs no download."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_kit.data.splits import stratified_split

#: Background plus the ten digits.
NUM_SCENE_CLASSES = 11
#: A pixel is the digit's in the mask where its ink covers at least this share of it.
INK_THRESHOLD = 0.5
#: Fixed seed of the glyph split: val and test scenes show handwritten samples train scenes never do.
GLYPH_SPLIT_SEED = 4321
#: Standard deviation of the per-pixel noise over the finished image (intensities in [0, 1]).
PIXEL_NOISE = 0.04


@dataclass(frozen=True)
class Scenes:
    """Images ``(N, 3, S, S)`` uint8 and their masks ``(N, S, S)`` int64: 0 background, 1 + digit."""

    images: Tensor
    masks: Tensor

    def __len__(self) -> int:
        return len(self.masks)


@dataclass(frozen=True)
class Digit:
    """One digit to draw: its ``glyph`` (ink in [0, 1]) scaled to ``side`` px, its top-left corner
    at ``(top, left)``, in ``colour`` (RGB in [0, 1])."""

    glyph: Tensor
    digit: int
    top: int
    left: int
    side: int
    colour: tuple[float, float, float]


def draw_digits(background: Tensor, digits: list[Digit]) -> tuple[Tensor, Tensor]:
    """The image ``(3, S, S)``: each digit's ink (its glyph upscaled bilinearly) alpha-blended over
    ``background`` in its colour; and the mask ``(S, S)``: ``1 + digit`` where that ink is at least
    ``INK_THRESHOLD``, else 0. Later digits paint over earlier ones, in the image and the mask."""
    image, mask = background.clone(), torch.zeros(background.shape[1:], dtype=torch.long)
    height, width = mask.shape
    for digit in digits:
        if digit.top < 0 or digit.left < 0 or digit.top + digit.side > height or digit.left + digit.side > width:
            raise ValueError(f"digit of side {digit.side} at ({digit.top}, {digit.left}) leaves the {tuple(mask.shape)} canvas")
        ink = F.interpolate(digit.glyph[None, None].float(), size=(digit.side, digit.side), mode="bilinear", align_corners=False)
        ink = ink[0, 0].clamp(0, 1)
        rows, cols = slice(digit.top, digit.top + digit.side), slice(digit.left, digit.left + digit.side)
        colour = torch.tensor(digit.colour, dtype=image.dtype).view(3, 1, 1)
        image[:, rows, cols] = image[:, rows, cols] * (1 - ink) + colour * ink
        mask[rows, cols] = torch.where(ink >= INK_THRESHOLD, digit.digit + 1, mask[rows, cols])
    return image, mask


def textured_backgrounds(count: int, size: int, rng: np.random.Generator) -> Tensor:
    """``(count, 3, size, size)`` in [0, 1]: a dim random colour, a sinusoidal grating of random
    frequency, angle, phase and colour, and smooth colour blotches; dimmer than the digits' colours
    on average, but not everywhere, so telling ink from background takes more than a threshold."""
    y, x = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="ij")
    angle, frequency, phase = (torch.from_numpy(rng.uniform(low, high, (count, 1, 1))) for low, high in ((0, np.pi), (1, 4), (0, 2 * np.pi)))
    wave = torch.sin(2 * np.pi * frequency * (x * torch.cos(angle) + y * torch.sin(angle)) + phase)
    base, stripes = torch.from_numpy(rng.uniform(0.0, 0.45, (count, 3, 1, 1))), torch.from_numpy(rng.uniform(-0.15, 0.15, (count, 3, 1, 1)))
    blotches = F.interpolate(torch.from_numpy(rng.normal(0.0, 0.08, (count, 3, 4, 4))), size=(size, size), mode="bicubic", align_corners=False)
    return (base + stripes * wave.unsqueeze(1) + blotches).clamp(0, 1).float()


def place_digits(glyphs: Tensor, labels: np.ndarray, size: int, rng: np.random.Generator) -> list[Digit]:
    """One digit of 50-75% of the canvas side anywhere, or (half the scenes) two of 40-50% in the two
    halves of the canvas, one above the other or side by side, so they never overlap and a location's
    class is not the scene's; glyphs and bright colours are drawn at random."""
    if rng.random() < 0.5:
        regions, (smallest, largest) = [(0, 0, size, size)], (0.5, 0.75)  # (top, left, height, width)
    else:
        half = size // 2
        regions, (smallest, largest) = [(0, 0, half, size), (half, 0, size - half, size)], (0.4, 0.5)
        if rng.random() < 0.5:
            regions = [(left, top, width, height) for top, left, height, width in regions]
    digits = []
    for top, left, height, width in regions:
        side = min(int(rng.integers(round(smallest * size), round(largest * size) + 1)), height, width)
        chosen, colour = int(rng.integers(len(glyphs))), tuple(float(c) for c in rng.uniform(0.55, 1.0, 3))
        top, left = top + int(rng.integers(height - side + 1)), left + int(rng.integers(width - side + 1))
        digits.append(Digit(glyphs[chosen], int(labels[chosen]), top, left, side, colour))
    return digits


def digit_scenes(glyphs: Tensor, labels: np.ndarray, count: int, size: int, rng: np.random.Generator) -> Scenes:
    """``count`` scenes of side ``size``: ``place_digits`` drawn by ``draw_digits`` over
    ``textured_backgrounds``, then per-pixel noise over the whole image."""
    images, masks = [], []
    for background in textured_backgrounds(count, size, rng):
        image, mask = draw_digits(background, place_digits(glyphs, labels, size, rng))
        noisy = image + torch.from_numpy(rng.normal(0.0, PIXEL_NOISE, image.shape)).float()
        images.append((noisy.clamp(0, 1) * 255).round().to(torch.uint8))
        masks.append(mask)
    return Scenes(torch.stack(images), torch.stack(masks))


def glyph_pools(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Indices of the glyphs each split draws from: a stratified 60 / 20 / 20% of the digits, fixed
    by ``GLYPH_SPLIT_SEED``, so val and test scenes hold handwriting the probe never trained on."""
    train, held = stratified_split(labels, 0.4, GLYPH_SPLIT_SEED)
    val, test = stratified_split(labels[held], 0.5, GLYPH_SPLIT_SEED)
    return {"train": train, "val": held[val], "test": held[test]}


def bold(glyphs: Tensor) -> Tensor:
    """Glyphs ``(N, 8, 8)`` with their strokes thickened by one pixel (the maximum over each 2x2
    neighbourhood): digits then cover about a fifth of a scene, not a tenth, so a feature grid of
    4x4 (a ResNet's last stage at 32 px) can still outline them."""
    return F.max_pool2d(F.pad(glyphs.unsqueeze(1), (1, 0, 1, 0)), kernel_size=2, stride=1).squeeze(1)


def digit_scene_splits(size: int, *, train: int, val: int, test: int, seed: int = 0) -> dict[str, Scenes]:
    """``{"train", "val", "test"}`` scenes of side ``size`` (``train`` / ``val`` / ``test`` of them)
    from scikit-learn's 1,797 embedded 8x8 digits (``bold``), each split from its own glyphs (``glyph_pools``)
    and its own random stream of ``seed``: the same arguments always give the same scenes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    glyphs = bold(torch.from_numpy(digits.images / 16.0).float())
    counts = {"train": train, "val": val, "test": test}
    return {
        split: digit_scenes(glyphs[pool], digits.target[pool], counts[split], size, np.random.default_rng([seed, number]))
        for number, (split, pool) in enumerate(glyph_pools(digits.target).items())
    }
