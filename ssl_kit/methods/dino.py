"""DINO, self-distillation with no labels (Caron et al. 2021), with an iBOT option (Zhou et al.
2022: masked patch tokens of the student predict the teacher's) and a Random-Teacher option
(Sarnthein et al. 2023: distil a frozen random network, a baseline for what the dynamics alone give).
Any backbone; iBOT needs a ViT (images, spectrograms or video, through ``ssl_kit.models.tokens``)."""

from __future__ import annotations

import math
import warnings

import torch
from lightly.models.modules.heads import DINOProjectionHead
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from ssl_kit.losses.dino import Centering, DINOLoss, IBOTPatchLoss
from ssl_kit.methods.base import SSLMethod
from ssl_kit.methods.momentum import EMAUpdater, MomentumTargets, frozen_copy
from ssl_kit.methods.msn import same_size_runs
from ssl_kit.models.backbones import build_from_spec
from ssl_kit.models.masking import beit_block_token_masks
from ssl_kit.models.tokens import ImageViTTokens, PatchTokens, patch_tokens


class DINOHead(DINOProjectionHead):
    """lightly's DINO head (3-layer GELU MLP, L2-normalised bottleneck, weight-normalised last
    layer without bias, the official design and initialisation), with the weight normalisation
    done by ``torch.nn.utils.parametrizations``: lightly's old-style ``weight_norm`` keeps a
    non-leaf ``weight`` tensor that ``copy.deepcopy`` refuses, so ``frozen_copy`` could not make the
    teacher an exact copy of the student (lightly's examples build the teacher head separately,
    from other random weights). ``norm_last_layer`` fixes the norms at 1."""

    def __init__(self, input_dim: int, hidden_dim: int, bottleneck_dim: int, output_dim: int, batch_norm: bool, norm_last_layer: bool) -> None:
        with warnings.catch_warnings():  # lightly's deprecated weight_norm, replaced just below
            warnings.simplefilter("ignore", FutureWarning)
            super().__init__(input_dim, hidden_dim, bottleneck_dim, output_dim, batch_norm=batch_norm)
        self.last_layer = parametrizations.weight_norm(nn.Linear(bottleneck_dim, output_dim, bias=False))
        norms = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            norms.fill_(1.0)
        norms.requires_grad_(not norm_last_layer)


@torch.no_grad()
def interpolate_parameters(module: nn.Module, other: nn.Module, alpha: float) -> None:
    """``module <- ((1 - alpha) module + alpha other) / sqrt((1 - alpha)^2 + alpha^2)``: a point
    between two independent initialisations with the variance of one (Random Teachers' locality)."""
    scale = math.sqrt((1 - alpha) ** 2 + alpha**2)
    for p, q in zip(module.parameters(), other.parameters(), strict=True):
        p.mul_(1 - alpha).add_(q, alpha=alpha).div_(scale)


class DINO(MomentumTargets, SSLMethod):
    """Student: backbone -> ``DINOHead``; teacher: an EMA copy of both (``frozen_copy``, no
    gradient, in no optimizer group), momentum cosine from ``ema_momentum`` to 1 over the run, one
    update per optimizer step.

    * Views: the first ``global_views`` are the global crops, the rest local crops
      (``ImageViews(num_views=2, local_views=N)``). The teacher sees the global crops, the student
      all of them; an image ViT accepts the smaller local crops (``allow_any_input_size``).
    * Loss: ``ssl_kit.losses.dino.DINOLoss`` (teacher global crop i against student crop j != i,
      centring with a global-batch EMA, teacher temperature warmed up over
      ``warmup_teacher_temp_fraction`` of the run). ``centering="sinkhorn_knopp"``: DINOv2's
      targets instead, balanced over the global batch by ``sinkhorn_iterations`` of Sinkhorn-Knopp
      (no center), for the class-token and the iBOT term alike.
    * The head's last layer gets no update while the run is in its first
      ``freeze_last_layer_fraction`` (the official code: the first epoch; a fraction of the run here,
      so it suits epoch, step and wall-clock budgets alike): its gradient is dropped after clipping.
    * ``final_weight_decay`` (every method's option, see ``BackboneModule``): the official ViT
      recipe ramps the weight decay 0.04 -> 0.4 along a cosine.
    * ``ibot_weight`` > 0 (ViTs): iBOT. In each global crop fed to the student, BEiT block masks
      (with probability ``ibot_mask_probability`` per image, ratio uniform in ``ibot_mask_ratio``)
      replace patch embeddings by a learnable mask token; the teacher sees the crops whole. The
      shared head maps the patch tokens too, and ``IBOTPatchLoss`` (own center, teacher temperature
      ``ibot_warmup_teacher_temp`` -> ``ibot_teacher_temp``) compares them at the masked positions,
      view with the same view; its weight is iBOT's lambda 2. The class-token term then uses the
      student's masked global crops, as in iBOT.
    * ``random_teacher``: the teacher keeps its random initialisation (no EMA) and runs in eval mode
      (BatchNorm on its initial statistics), and the loss pairs each view with the *same* view
      (Random Teachers: one unaugmented view, seen by both; give the data one view without
      augmentation and ``global_views: 1``). As in the official code the teacher is the student's
      initial copy; ``random_teacher_student_alpha`` > 0 moves the student towards an independent
      initialisation (1: fully independent). A student identical to its teacher only learns where
      the two differ (BatchNorm in train vs eval mode, dropout, or different temperatures): a ViT
      with equal temperatures needs alpha > 0. The paper's recipe is in
      ``configs/dino_mnist.yaml``'s header: temperatures 1, no centring, AdamW lr 1e-3, no weight
      decay, no frozen last layer.
    * Online probe and kNN monitor, and export: the student's backbone (features of the first
      global crop, masked under iBOT, feed the probe); the official code evaluates the EMA
      teacher, which a random teacher could not stand in for.
    """

    sync_batchnorm = True

    def __init__(
        self,
        *args,
        projection_hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        output_dim: int = 65536,
        head_batch_norm: bool = False,
        norm_last_layer: bool = True,
        global_views: int = 2,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_fraction: float = 0.3,
        center_momentum: float = 0.9,
        centering: Centering = "ema",
        sinkhorn_iterations: int = 3,
        ema_momentum: float = 0.996,
        freeze_last_layer_fraction: float = 0.01,
        ibot_weight: float = 0.0,
        ibot_teacher_temp: float = 0.07,
        ibot_warmup_teacher_temp: float = 0.04,
        ibot_mask_ratio: tuple[float, float] = (0.1, 0.5),
        ibot_mask_probability: float = 0.5,
        random_teacher: bool = False,
        random_teacher_student_alpha: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if global_views < 1:
            raise ValueError(f"global_views must be at least 1, got {global_views}")
        if not 0.0 <= random_teacher_student_alpha <= 1.0:
            raise ValueError(f"random_teacher_student_alpha must be in [0, 1], got {random_teacher_student_alpha}")
        self.patches: PatchTokens | None = None
        if ibot_weight > 0:
            self.patches = patch_tokens(self.backbone)  # TypeError for a non-ViT backbone
            self.mask_token = nn.Parameter(torch.zeros(self.patches.embed_dim))
        if self.input_spec.modality == "image" and isinstance(self.backbone, VisionTransformer):
            ImageViTTokens(self.backbone).allow_any_input_size()  # multi-crop: local crops are smaller

        def head() -> DINOHead:
            return DINOHead(self.feature_dim, projection_hidden_dim, bottleneck_dim, output_dim, head_batch_norm, norm_last_layer)

        self.projector = head()
        # not "teacher_backbone": exports deliver a module of that name (the self-training teachers')
        self.teacher_encoder = frozen_copy(self.backbone)
        self.teacher_head = frozen_copy(self.projector)
        for module in self.teacher_encoder.modules():  # the official teacher is built without drop path
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
        self.teacher_patches = patch_tokens(self.teacher_encoder) if self.patches is not None else None
        if random_teacher and random_teacher_student_alpha > 0:
            interpolate_parameters(self.backbone, build_from_spec(self.backbone_spec), random_teacher_student_alpha)
            interpolate_parameters(self.projector, head(), random_teacher_student_alpha)

        shared = dict(
            student_temp=student_temp, warmup_fraction=warmup_teacher_temp_fraction, center_momentum=center_momentum,
            centering=centering, sinkhorn_iterations=sinkhorn_iterations,
        )  # fmt: skip
        self.criterion = DINOLoss(output_dim, teacher_temp=teacher_temp, warmup_teacher_temp=warmup_teacher_temp, same_view=random_teacher, **shared)
        if ibot_weight > 0:
            self.patch_criterion = IBOTPatchLoss(output_dim, teacher_temp=ibot_teacher_temp, warmup_teacher_temp=ibot_warmup_teacher_temp, **shared)
        pairs = [] if random_teacher else [(self.teacher_encoder, self.backbone), (self.teacher_head, self.projector)]
        self.ema = EMAUpdater(pairs, base=1.0 if random_teacher else ema_momentum, final=1.0, schedule="cosine")

    # -- schedules ---------------------------------------------------------------------------
    def progress(self) -> float:
        """How far through its budget the run is at the current optimizer step (0 outside a fit)."""
        return self.run_fraction(self.global_step) if self._trainer is not None else 0.0

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.log("train/teacher_temp", self.criterion.temperature(self.progress()))

    def last_layer_frozen(self, progress: float) -> bool:
        return progress < self.hparams.freeze_last_layer_fraction

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """``--trainer.gradient_clip_val`` clips the student (backbone, head, mask token) alone, as
        the official code: the online probe keeps its gradient. Then, in the official order, the
        last layer's gradient is dropped while it is frozen, so the optimizer leaves it as it is
        (no update, no weight decay)."""
        if gradient_clip_val:
            student = [p for p in self.student_parameters() if p.grad is not None]
            clip = nn.utils.clip_grad_value_ if gradient_clip_algorithm == "value" else nn.utils.clip_grad_norm_
            clip(student, gradient_clip_val)
        if self.last_layer_frozen(self.progress()):
            for param in self.projector.last_layer.parameters():
                param.grad = None

    # -- forward passes ----------------------------------------------------------------------
    def block_masks(self, inputs: Tensor) -> Tensor:
        grid = tuple(side // patch for side, patch in zip(inputs.shape[2:], self.patches.patch_size))
        hp = self.hparams
        return beit_block_token_masks(inputs.shape[0], grid, hp.ibot_mask_ratio, hp.ibot_mask_probability, device=inputs.device)

    @torch.no_grad()
    def teacher_outputs(self, global_crops: Tensor) -> tuple[Tensor, Tensor | None]:
        """Head outputs of the pooled feature (and, under iBOT, of every patch token)."""
        self.teacher_encoder.train(self.training and not self.hparams.random_teacher)
        self.teacher_head.train(self.training and not self.hparams.random_teacher)
        if self.teacher_patches is None:
            return self.teacher_head(self.teacher_encoder(global_crops)), None
        tokens = self.teacher_patches.tokens(global_crops)
        patches = tokens[:, self.teacher_patches.num_prefix_tokens :]
        return self.teacher_head(self.teacher_patches.pooled(tokens)), self.teacher_head(patches)

    def student_global_features(self, global_crops: Tensor, masks: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Pooled backbone features of the global crops (and their patch tokens, under iBOT)."""
        if masks is None:
            return self.backbone(global_crops), None
        tokens = self.patches.tokens_with_mask_token(global_crops, masks, self.mask_token)
        return self.patches.pooled(tokens), tokens[:, self.patches.num_prefix_tokens :]

    def training_loss(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        num_global = self.hparams.global_views
        if len(views) < num_global:
            raise ValueError(f"DINO got {len(views)} views for {num_global} global crops: give e.g. ImageViews(num_views=2, local_views=N)")
        batch = views[0].shape[0]
        progress = self.progress()
        global_crops = torch.cat(views[:num_global])
        masks = self.block_masks(global_crops) if self.patches is not None else None
        teacher, teacher_patches = self.teacher_outputs(global_crops)
        features, student_patches = self.student_global_features(global_crops, masks)
        local_features = [self.backbone(torch.cat(run)) for run in same_size_runs(views[num_global:])]
        student = self.projector(torch.cat([features, *local_features]))
        loss = self.criterion(teacher.chunk(num_global), student.chunk(len(views)), progress)
        if self.patches is not None:
            patch_loss = self.patch_criterion(
                teacher_patches.chunk(num_global), self.projector(student_patches).chunk(num_global), masks.chunk(num_global), progress
            )
            loss = loss + self.hparams.ibot_weight * patch_loss
        return loss, features[:batch]

    # -- optimisation ------------------------------------------------------------------------
    def student_parameters(self) -> list[nn.Parameter]:
        mask_token = [self.mask_token] if self.patches is not None else []
        return [*self.backbone.parameters(), *self.projector.parameters(), *mask_token]

    def param_groups(self) -> list[dict]:
        """The base groups, with iBOT's mask token (a parameter of the method itself) in the group
        without weight decay."""
        decay, no_decay, *extra = super().param_groups()
        if self.patches is not None:
            no_decay["params"].append(self.mask_token)
        return [decay, no_decay, *extra]
