"""lightly's documented pipelines for the methods ssl_kit shares with it, so a suite can train them
for the same budget on the same backbone and images and evaluate them by the same protocols.

Each follows lightly's ``examples/pytorch_lightning/<method>.py``: its transform (per sample, in
the loader workers), heads, loss, optimizer and the plain Trainer loop with no schedule. What is
ssl_kit's instead: the backbone (the cell's own, built from its config, at random init: "same
backbone"), the images (the DataModule's pretraining split), the batch size and loader workers
(the config's), and the Trainer's budget (``max_time`` / ``max_epochs`` / ``max_steps``). MSN keeps
lightly's ``prototypes.data`` (its prototypes get no gradient), as documented. Momentum schedules
read the epoch over the examples' 10 epochs, as the examples do (I-JEPA's, linear by step, over
10 epochs of steps). lightly has no MoCo v3 (its MoCo is v2), so there is no MoCo v3 reference.
I-JEPA is documented for a torchvision ViT only (``examples/pytorch/ijepa.py``); here lightly's timm
parts take its place (``MaskedVisionTransformerTIMM`` as the encoders, ``IJEPAPredictorTIMM``) with
the example's collator, transform, loss, optimizer and momentum.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F
from lightly.data.ijepa_collate import IJEPAMaskCollator
from lightly.loss import BarlowTwinsLoss, DINOLoss, MSNLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerTIMM
from lightly.models.modules.ijepa_timm import IJEPAPredictorTIMM
from lightly.models.modules.heads import (
    BarlowTwinsProjectionHead, BYOLPredictionHead, BYOLProjectionHead, DINOProjectionHead, MSNProjectionHead,
    SimCLRProjectionHead, VICRegProjectionHead,
)  # fmt: skip
from lightly.models.modules.masked_autoencoder_timm import MAEDecoderTIMM
from lightly.transforms import (
    BYOLTransform, BYOLView1Transform, BYOLView2Transform, DINOTransform, MAETransform, MSNTransform, SimCLRTransform,
    VICRegTransform,
)  # fmt: skip
from lightly.transforms.ijepa_transform import IJEPATransform
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn

from ssl_kit.models.tokens import ImageViTTokens


class TwoViewReference(L.LightningModule):
    """lightly's SimCLR / Barlow Twins / VICReg example module: backbone -> projection head on two views, SGD 0.06."""

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


class BYOLReference(L.LightningModule):
    """lightly's BYOL example: projection 1024 -> 256 and prediction heads, a momentum copy of
    backbone and projection head (cosine 0.996 -> 1 over 10 epochs), symmetric negative cosine, SGD 0.06."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(backbone.num_features, 1024, 256)
        self.prediction_head = BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def forward_momentum(self, x: Tensor) -> Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def training_step(self, batch, batch_idx):
        momentum = cosine_schedule(self.current_epoch, 10, 0.996, 1)
        utils.update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        utils.update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)
        x0, x1 = batch[0][:2]
        p0, p1 = (self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1))) for x in (x0, x1))
        loss = 0.5 * (self.criterion(p0, self.forward_momentum(x1)) + self.criterion(p1, self.forward_momentum(x0)))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.06)


class DINOReference(L.LightningModule):
    """lightly's DINO example: student and momentum teacher heads (512 hidden, 64 bottleneck, 2048
    out; the student's last layer frozen in epoch 0), teacher momentum cosine 0.996 -> 1 over 10
    epochs, teacher temperature warmup over 5 epochs, the teacher on the two global crops and the
    student on every crop, Adam 1e-3."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        dim = backbone.num_features
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(dim, 512, 64, 2048, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = DINOProjectionHead(dim, 512, 64, 2048)
        utils.deactivate_requires_grad(self.teacher_backbone)
        utils.deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=5)

    def training_step(self, batch, batch_idx):
        momentum = cosine_schedule(self.current_epoch, 10, 0.996, 1)
        utils.update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        utils.update_momentum(self.student_head, self.teacher_head, m=momentum)
        views = batch[0]
        teacher_out = [self.teacher_head(self.teacher_backbone(view).flatten(start_dim=1)) for view in views[:2]]
        student_out = [self.student_head(self.student_backbone(view).flatten(start_dim=1)) for view in views]
        loss = self.criterion(teacher_out, student_out, epoch=self.current_epoch)
        self.log("train/loss", loss)
        return loss

    def on_after_backward(self) -> None:
        self.student_head.cancel_last_layer_gradients(current_epoch=self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.001)


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


class IJEPAReference(L.LightningModule):
    """lightly's I-JEPA example on a timm ViT: the context encoder sees the collator's context block
    (``IJEPAMaskCollator``'s defaults: 1 context, 2 target blocks), a predictor of the encoder's
    depth, width and heads predicts the EMA target encoder's layer-normalised tokens of each target
    block, smooth L1, AdamW 1.5e-4, target momentum linear 0.996 -> 1 over 10 epochs of steps,
    updated after each optimizer step. ``collate`` is the collator the loader must use."""

    def __init__(self, vit: nn.Module, image_size: int) -> None:
        super().__init__()
        self.encoder = MaskedVisionTransformerTIMM(vit=vit)
        self.target_encoder = copy.deepcopy(self.encoder)
        utils.deactivate_requires_grad(self.target_encoder)
        self.prefix = vit.num_prefix_tokens
        self.predictor = IJEPAPredictorTIMM(
            num_patches=vit.patch_embed.num_patches, depth=len(vit.blocks), mlp_dim=vit.embed_dim,
            predictor_embed_dim=vit.embed_dim, num_heads=vit.blocks[0].attn.num_heads,
        )  # fmt: skip
        self.collate = IJEPAMaskCollator(input_size=image_size, patch_size=vit.patch_embed.patch_size[0])
        self.criterion = nn.SmoothL1Loss()

    def patch_tokens(self, encoder: nn.Module, images: Tensor, patches: Tensor | None = None) -> Tensor:
        """Encoded patch tokens (all, or those at ``patches``), without the ViT's prefix tokens."""
        keep = None
        if patches is not None:
            prefix = torch.arange(self.prefix, device=images.device).expand(len(images), -1)
            keep = torch.cat([prefix, patches + self.prefix], dim=1)
        return encoder.encode(images, idx_keep=keep)[:, self.prefix :]

    def training_step(self, batch, batch_idx):
        (images, _), context_masks, target_masks = batch
        with torch.no_grad():
            targets = self.patch_tokens(self.target_encoder, images)
            targets = utils.apply_masks(F.layer_norm(targets, (targets.shape[-1],)), target_masks)
            targets = utils.repeat_interleave_batch(targets, len(images), repeat=len(context_masks))
        context = torch.cat([self.patch_tokens(self.encoder, images, mask) for mask in context_masks])
        loss = self.criterion(self.predictor(context, context_masks, target_masks), targets)
        self.log("train/loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        steps = 10 * max(1, int(self.trainer.num_training_batches))
        momentum = min(1.0, 0.996 + 0.004 * self.global_step / steps)
        utils.update_momentum(self.encoder, self.target_encoder, m=momentum)

    def configure_optimizers(self):
        return torch.optim.AdamW([*self.encoder.parameters(), *self.predictor.parameters()], lr=1.5e-4)


def reference_pipeline(method: str, backbone: nn.Module, image_size: int) -> tuple[L.LightningModule, object, nn.Module]:
    """lightly's module and transform for ``method`` on ``backbone``, and the network to evaluate
    (the trained encoder: for MSN the anchor encoder, as ssl_kit evaluates its online encoder). A
    module with a ``collate`` attribute (I-JEPA's mask collator) needs its loader to collate with it."""
    if method == "SimCLR":
        module = TwoViewReference(backbone, SimCLRProjectionHead(backbone.num_features, 2048, 2048), NTXentLoss())
        return module, SimCLRTransform(input_size=image_size), backbone
    if method == "BarlowTwins":
        transform = BYOLTransform(
            view_1_transform=BYOLView1Transform(input_size=image_size, gaussian_blur=0.0),
            view_2_transform=BYOLView2Transform(input_size=image_size, gaussian_blur=0.0),
        )
        return TwoViewReference(backbone, BarlowTwinsProjectionHead(backbone.num_features, 2048, 2048), BarlowTwinsLoss()), transform, backbone
    if method == "BYOL":
        transform = BYOLTransform(
            view_1_transform=BYOLView1Transform(input_size=image_size, gaussian_blur=0.0),
            view_2_transform=BYOLView2Transform(input_size=image_size, gaussian_blur=0.0),
        )
        return BYOLReference(backbone), transform, backbone
    if method == "VICReg":
        head = VICRegProjectionHead(backbone.num_features, 2048, 2048, num_layers=2)
        return TwoViewReference(backbone, head, VICRegLoss()), VICRegTransform(input_size=image_size), backbone
    if method == "DINO":
        if hasattr(backbone, "patch_embed"):
            ImageViTTokens(backbone).allow_any_input_size()  # the local crops are smaller
        transform = DINOTransform(global_crop_size=image_size, local_crop_size=max(8, round(image_size * 96 / 224)))
        return DINOReference(backbone), transform, backbone
    if method == "MAE":
        return MAEReference(backbone), MAETransform(input_size=image_size), backbone
    if method == "MSN":
        module = MSNReference(backbone)
        transform = MSNTransform(random_size=image_size, focal_size=image_size // 2)
        return module, transform, module.anchor_backbone.vit
    if method == "IJEPA":
        return IJEPAReference(backbone, image_size), IJEPATransform(input_size=image_size), backbone
    raise ValueError(f"lightly has no documented pipeline for {method!r}; known: SimCLR, BarlowTwins, BYOL, VICReg, DINO, MAE, MSN, IJEPA")
