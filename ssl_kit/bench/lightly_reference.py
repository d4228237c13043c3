"""lightly's documented pipelines for the methods ssl_kit shares with it, so a suite can train them
for the same budget on the same backbone and images and evaluate them by the same protocols.

Each follows lightly's ``examples/pytorch_lightning/<method>.py``: its transform (per sample, in
the loader workers), heads, loss, optimizer and the plain Trainer loop with no schedule. What is
ssl_kit's instead: the backbone (the cell's own, built from its config, at random init: "same
backbone"), the images (the DataModule's pretraining split), the batch size and loader workers
(the config's), and the Trainer's budget (``max_time`` / ``max_epochs`` / ``max_steps``). MSN keeps
lightly's ``prototypes.data`` (its prototypes get no gradient), as documented. lightly has no MoCo
v3 (its MoCo is v2), so there is no MoCo v3 reference.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from lightly.loss import BarlowTwinsLoss, MSNLoss, NTXentLoss
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerTIMM
from lightly.models.modules.heads import BarlowTwinsProjectionHead, MSNProjectionHead, SimCLRProjectionHead
from lightly.models.modules.masked_autoencoder_timm import MAEDecoderTIMM
from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, MAETransform, MSNTransform, SimCLRTransform
from torch import Tensor, nn


class TwoViewReference(L.LightningModule):
    """lightly's SimCLR / Barlow Twins example module: backbone -> projection head on two views, SGD 0.06."""

    def __init__(self, backbone: nn.Module, head: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.backbone, self.projection_head, self.criterion = backbone, head, criterion

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def training_step(self, batch, batch_index):
        x0, x1 = batch[0][:2]
        loss = self.criterion(self.forward(x0), self.forward(x1))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.06)


class MAEReference(L.LightningModule):
    """lightly's MAE example (timm ViT): 75% masking, a 1-block 512-d decoder, MSE on raw pixels, AdamW 1.5e-4."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.mask_ratio = 0.75
        self.patch_size = vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder = MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, patch_size=self.patch_size, in_chans=vit.patch_embed.proj.in_channels,
            embed_dim=vit.embed_dim, decoder_embed_dim=512, decoder_depth=1, decoder_num_heads=16, mlp_ratio=4.0,
            proj_drop_rate=0.0, attn_drop_rate=0.0,
        )  # fmt: skip
        self.criterion = nn.MSELoss()

    def training_step(self, batch, batch_idx):
        images = batch[0][0]
        batch_size = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(batch_size, self.sequence_length), mask_ratio=self.mask_ratio, device=images.device)
        encoded = self.backbone.encode(images=images, idx_keep=idx_keep)
        decoded = self.decoder.embed(encoded)
        masked = utils.repeat_token(self.decoder.mask_token, (batch_size, self.sequence_length))
        masked = utils.set_at_index(masked, idx_keep, decoded.type_as(masked))
        prediction = self.decoder.predict(utils.get_at_index(self.decoder.decode(masked), idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)  # no class token in the patches
        loss = self.criterion(prediction, target)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1.5e-4)


class MSNReference(L.LightningModule):
    """lightly's MSN example (timm ViT): the anchor (online) network masks 15% of its patches,
    the EMA target (momentum 0.996) sees the target view, 1024 prototypes, AdamW 1.5e-4."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.mask_ratio = 0.15
        vit.dynamic_img_size = True  # the focal views are smaller
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.projection_head = MSNProjectionHead(vit.embed_dim)
        self.anchor_backbone = copy.deepcopy(self.backbone)
        self.anchor_projection_head = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone)
        utils.deactivate_requires_grad(self.projection_head)
        self.prototypes = nn.Linear(256, 1024, bias=False).weight
        self.criterion = MSNLoss()

    def training_step(self, batch, batch_idx):
        utils.update_momentum(self.anchor_backbone, self.backbone, 0.996)
        utils.update_momentum(self.anchor_projection_head, self.projection_head, 0.996)
        views = batch[0]
        targets_out = self.projection_head(self.backbone(images=views[0]))
        anchors_out = torch.cat([self.encode_masked(views[1]), self.encode_masked(torch.cat(views[2:]))])
        loss = self.criterion(anchors_out, targets_out, self.prototypes.data)
        self.log("train/loss", loss)
        return loss

    def encode_masked(self, anchors: Tensor) -> Tensor:
        patches = (anchors.shape[-1] // self.anchor_backbone.vit.patch_embed.patch_size[0]) ** 2
        idx_keep, _ = utils.random_token_mask(size=(anchors.shape[0], patches + 1), mask_ratio=self.mask_ratio, device=anchors.device)
        return self.anchor_projection_head(self.anchor_backbone(images=anchors, idx_keep=idx_keep))

    def configure_optimizers(self):
        params = [*self.anchor_backbone.parameters(), *self.anchor_projection_head.parameters(), self.prototypes]
        return torch.optim.AdamW(params, lr=1.5e-4)


def reference_pipeline(method: str, backbone: nn.Module, image_size: int) -> tuple[L.LightningModule, object, nn.Module]:
    """lightly's module and transform for ``method`` on ``backbone``, and the network to evaluate
    (the trained encoder: for MSN the anchor encoder, as ssl_kit evaluates its online encoder)."""
    if method == "SimCLR":
        module = TwoViewReference(backbone, SimCLRProjectionHead(backbone.num_features, 2048, 2048), NTXentLoss())
        return module, SimCLRTransform(input_size=image_size), backbone
    if method == "BarlowTwins":
        transform = BYOLTransform(
            view_1_transform=BYOLView1Transform(input_size=image_size, gaussian_blur=0.0),
            view_2_transform=BYOLView2Transform(input_size=image_size, gaussian_blur=0.0),
        )
        return TwoViewReference(backbone, BarlowTwinsProjectionHead(backbone.num_features, 2048, 2048), BarlowTwinsLoss()), transform, backbone
    if method == "MAE":
        return MAEReference(backbone), MAETransform(input_size=image_size), backbone
    if method == "MSN":
        module = MSNReference(backbone)
        transform = MSNTransform(random_size=image_size, focal_size=image_size // 2)
        return module, transform, module.anchor_backbone.vit
    raise ValueError(f"lightly has no documented pipeline for {method!r}; known: SimCLR, BarlowTwins, MAE, MSN")
