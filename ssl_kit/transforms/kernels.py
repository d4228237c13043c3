"""The tensor kernels of the batched, on-device views: each applies one augmentation to a whole
batch with per-sample parameters (a crop box, a jitter factor, a mask row), on any device. Image
and clip frames (``batched.py``) and spectrograms (``batched_audio.py``) share this file, so a
new batched transform reuses what is here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Keys' cubic convolution coefficient, the one of ``F.interpolate(mode="bicubic")``.
CUBIC_A = -0.75


# -- images and clip frames ------------------------------------------------------------------
def resized_crop(images: Tensor, box: Tensor, flip: Tensor, size: int) -> Tensor:
    """Per-sample ``resized_crop`` (bilinear, no antialias) then ``hflip`` where ``flip``, in one
    ``grid_sample``. Sampling positions are clamped to the box, as ``interpolate`` clamps them to the
    edge of the cropped image, so the result matches torchvision's crop-then-resize."""
    steps = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size
    top, left, height, width = box.to(images.dtype).unbind(1)

    def positions(start: Tensor, length: Tensor) -> Tensor:
        start, length = start[:, None], length[:, None]
        return (start + steps * length - 0.5).clamp(start, start + length - 1)

    ys, xs = positions(top, height), positions(left, width)
    xs = torch.where(flip[:, None], xs.flip(1), xs)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), -1)
    extent = torch.tensor([images.shape[-1], images.shape[-2]], device=images.device, dtype=images.dtype)
    grid = (2 * grid + 1) / extent - 1  # pixel centres to align_corners=False coordinates
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _per_sample(factor: Tensor) -> Tensor:
    return factor.view(-1, 1, 1, 1)


def _gray(images: Tensor) -> Tensor:
    """torchvision's luma weights, ``(B, 1, H, W)``."""
    r, g, b = images.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(images: Tensor, other: Tensor | float, factor: Tensor) -> Tensor:
    factor = _per_sample(factor)
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    return _blend(images, 0.0, factor)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    return _blend(images, _gray(images).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    return _blend(images, _gray(images), factor)


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotates the HSV hue by ``shift`` turns per sample (torchvision's ``adjust_hue``), with the
    closed-form HSV to RGB conversion ``V - V S clamp(min(k, 4 - k), 0, 1)``."""
    value, channel = images.max(1)
    chroma = value - images.amin(1)
    r, g, b = images.unbind(1)
    nonzero = torch.where(chroma > 0, chroma, 1.0)
    hue = torch.where(channel == 1, (b - r) / nonzero + 2, (r - g) / nonzero + 4)
    hue = torch.where(channel == 0, (g - b) / nonzero, hue) + 6 * shift.view(-1, 1, 1)  # in sixths of a turn
    saturation = chroma / torch.where(value > 0, value, 1.0)
    k = (torch.tensor([5.0, 3.0, 1.0], device=images.device).view(1, 3, 1, 1) + hue.unsqueeze(1)).remainder(6)
    return value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(images: Tensor, factors: Tensor, order: Tensor, applied: Tensor, enabled: list[bool]) -> Tensor:
    """torchvision's ``ColorJitter`` on the samples where ``applied``, each with its own op order:
    at every step the samples are grouped by the op they apply, so each op runs once per sample.
    The group sizes cost one host sync per call."""
    step_ops = torch.where(applied[:, None], order, len(ADJUST))  # (B, 4); len(ADJUST): nothing
    keys = step_ops + (len(ADJUST) + 1) * torch.arange(len(ADJUST), device=order.device)
    sizes = torch.bincount(keys.flatten(), minlength=len(ADJUST) * (len(ADJUST) + 1)).view(len(ADJUST), -1).tolist()
    out = images.clone()
    for step, step_sizes in enumerate(sizes):
        groups = step_ops[:, step].argsort(stable=True).split(step_sizes)
        for op, rows in enumerate(groups[: len(ADJUST)]):
            if enabled[op] and len(rows):
                out[rows] = ADJUST[op](out[rows], factors[rows, op])
    return out


def grayscale(images: Tensor, mask: Tensor) -> Tensor:
    return torch.where(_per_sample(mask), _gray(images).expand_as(images), images)


def gaussian_blur(images: Tensor, sigma: Tensor, mask: Tensor, kernel_size: int) -> Tensor:
    """torchvision's ``gaussian_blur`` (reflect padding) with a per-sample sigma where ``mask`` and the
    identity elsewhere: separable depthwise convolutions with one kernel per sample and channel."""
    batch, channels, height, width = images.shape
    offsets = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - kernel_size // 2
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    kernel = torch.where(mask[:, None], kernel / kernel.sum(1, keepdim=True), (offsets == 0).to(images.dtype))
    kernel = kernel.repeat_interleave(channels, 0)  # (B * C, k)
    pad = kernel_size // 2
    out = F.pad(images, (pad, pad, pad, pad), mode="reflect").reshape(1, batch * channels, height + 2 * pad, width + 2 * pad)
    out = F.conv2d(out, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)
    out = F.conv2d(out, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return out.view(batch, channels, height, width)


def solarize(images: Tensor, mask: Tensor, threshold: float) -> Tensor:
    return torch.where(_per_sample(mask) & (images >= threshold), 1 - images, images)


def erase(images: Tensor, box: Tensor, mask: Tensor, value: float) -> Tensor:
    """torchvision's ``erase`` of each sample's ``box`` (top, left, height, width) with ``value`` where ``mask``."""
    top, left, height, width = box[:, :, None, None].unbind(1)
    rows = torch.arange(images.shape[-2], device=images.device).view(1, -1, 1)
    cols = torch.arange(images.shape[-1], device=images.device).view(1, 1, -1)
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width) & mask.view(-1, 1, 1)
    return images.masked_fill(inside.unsqueeze(1), value)


# -- spectrograms ----------------------------------------------------------------------------
def cubic_weights(start: Tensor, length: Tensor, size: int, out_size: int) -> Tensor:
    """``(B, out_size, size)`` matrices resampling rows ``start .. start + length - 1`` of an axis of
    ``size`` to ``out_size`` as ``F.interpolate(mode="bicubic", align_corners=False)`` resamples the
    cropped rows (taps clamped to the crop); rows past ``size`` are zero padding and get no weight."""
    scale = (length.to(torch.float32) / out_size)[:, None]
    source = (torch.arange(out_size, device=start.device) + 0.5) * scale - 0.5
    base = source.floor()
    t = (source - base).unsqueeze(-1)
    a = CUBIC_A
    distance = torch.cat([t + 1, t, 1 - t, 2 - t], -1)  # to taps base-1 .. base+2
    near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
    weights = torch.where(distance <= 1, near, far)
    taps = (base.long().unsqueeze(-1) + torch.arange(-1, 3, device=start.device)).clamp(min=0)
    taps = torch.minimum(taps, (length - 1).view(-1, 1, 1)) + start.view(-1, 1, 1)
    weights = weights * (taps < size)
    matrix = torch.zeros(len(start), out_size, size, device=start.device)
    return matrix.scatter_add_(2, taps.clamp(max=size - 1), weights)


def resize_crop(spectrograms: Tensor, crop: Tensor) -> Tensor:
    """``AudioViews.resize_crop`` of every sample ``(B, 1, H, W)`` with its own region (top, left,
    height, width; zero padding past the bottom and right), resized back to ``(H, W)``."""
    height, width = spectrograms.shape[-2:]
    top, left, crop_h, crop_w = crop.unbind(1)
    rows = cubic_weights(top, crop_h, height, height)
    cols = cubic_weights(left, crop_w, width, width)
    return torch.einsum("bih,bchw,bjw->bcij", rows, spectrograms, cols)


def span_mask(spans: Tensor, size: int) -> Tensor:
    """``(B, size)``: positions inside any of each sample's ``(start, length)`` spans ``(B, K, 2)``."""
    position = torch.arange(size, device=spans.device).view(1, 1, -1)
    start, length = spans[..., :1], spans[..., 1:]
    return ((position >= start) & (position < start + length)).any(1)
