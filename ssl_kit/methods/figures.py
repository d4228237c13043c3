"""Figures of what a method learned, drawn by callbacks so the methods keep to training: MAE's
reconstructions of fixed validation samples under a fixed mask."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import make_grid, save_image

#: Seed of the fixed mask used for the reconstruction figures (same mask every epoch).
FIGURE_MASK_SEED = 0
#: Tiny images are zoomed (nearest neighbour, integer factor) to about this side in the figures.
FIGURE_MIN_SIDE = 64


class ReconstructionFigures(Callback):
    """Each validation epoch, rank zero saves ``<log_dir>/reconstructions/epochNNNN.png`` (and logs
    it to TensorBoard when attached): the first ``count`` samples of the validation set (second
    validation loader) as original | masked | reconstruction (``reconstruction_grid``)."""

    def __init__(self, count: int = 8) -> None:
        self.count = count
        self.inputs: Tensor | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 1 and batch_idx == 0:
            self.inputs = batch[0][: self.count].detach().clone()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        inputs, self.inputs = self.inputs, None
        if trainer.sanity_checking or inputs is None:
            return
        # trainer.log_dir broadcasts from rank zero: every rank must ask for it.
        root = trainer.log_dir or trainer.default_root_dir
        self.save(pl_module, inputs, Path(root) / "reconstructions" / f"epoch{trainer.current_epoch:04d}.png")

    @rank_zero_only
    def save(self, model, inputs: Tensor, path: Path) -> None:
        grid = reconstruction_grid(model, inputs)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        for logger in model.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/reconstructions", grid, global_step=model.global_step)


@torch.no_grad()
def reconstruction_grid(model, inputs: Tensor, seed: int = FIGURE_MASK_SEED) -> Tensor:
    """``(3, H', W')`` figure in [0, 1] of an ``MAE``'s reconstructions. Images and spectrograms:
    one row per sample, original | masked | reconstruction. Clips: per sample, three rows of frames
    (original, masked, reconstruction; a tubelet's time steps are consecutive frames)."""
    inputs = inputs.to(model.device)
    token_mask = model.random_mask(inputs.shape[0], torch.Generator().manual_seed(seed))
    patches = model.patches.patchify(inputs)
    masked = model.patches.unpatchify(torch.where(token_mask.mask.unsqueeze(-1), torch.nan, patches))
    original = model.patches.covered(inputs)
    panels = display_range(model, torch.stack([original, masked, model.reconstruct(inputs, token_mask)], dim=1))
    panels = panels.nan_to_num(0.5)  # hidden patches grey
    if panels.shape[2] not in (1, 3):
        panels = panels[:, :, :1]
    if panels.ndim == 6:  # clips (B, 3, C, T, H, W): every frame a tile, T per row
        columns = panels.shape[3]
        panels = panels.permute(0, 1, 3, 2, 4, 5).flatten(0, 2)
    else:
        columns = 3
        panels = panels.flatten(0, 1)
    zoom = max(1, FIGURE_MIN_SIDE // max(panels.shape[-2:]))
    if zoom > 1:
        panels = F.interpolate(panels, scale_factor=zoom, mode="nearest")
    return make_grid(panels.float().cpu(), nrow=columns, padding=2, pad_value=1.0)


def display_range(model, panels: Tensor) -> Tensor:
    """``(B, 3, C, ...)`` original | masked | reconstruction in input units -> [0, 1]: undoes
    the DataModule's mean/std where it has them (images, clips); inputs without a pixel
    normalisation (spectrograms) are scaled by each original's own range."""
    datamodule = getattr(model.trainer, "datamodule", None) if model._trainer is not None else None
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if mean is not None and std is not None and len(mean) == panels.shape[2] == len(std):
        shape = (1, 1, -1) + (1,) * (panels.ndim - 3)
        return (panels * torch.tensor(std).to(panels).view(shape) + torch.tensor(mean).to(panels).view(shape)).clamp(0, 1)
    original = panels[:, 0].flatten(1)
    low = original.min(1).values.view(-1, *(1,) * (panels.ndim - 1))
    high = original.max(1).values.view(-1, *(1,) * (panels.ndim - 1))
    return ((panels - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
