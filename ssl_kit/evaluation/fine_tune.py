"""End-to-end fine-tuning of a backbone with a linear head, optionally with layer-wise lr decay;
hyper-parameters are given, not searched, and the test split is evaluated once with the final weights."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_kit.data.base import SSLDataModule
from ssl_kit.data.datasets import Transformed
from ssl_kit.evaluation.features import per_view
from ssl_kit.optim import DECAYED, OptimizerName, build_optimizer, decay_groups, warmup_cosine_config
from ssl_kit.transforms import ViewAugmentation


def stage_prefixes(backbone: nn.Module) -> list[str]:
    """Parameter-name prefixes of the backbone's stages in depth order: the transformer blocks of
    timm ViTs and ``VideoViT`` (``blocks.N.``), or ResNet's ``layer1.`` .. ``layer4.``."""
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return [f"blocks.{i}." for i in range(len(blocks))]
    layers = [f"layer{i}." for i in range(1, 5) if hasattr(backbone, f"layer{i}")]
    if layers:
        return layers
    raise ValueError(f"layer-wise lr decay knows ViT blocks and ResNet layer1..4, not {type(backbone).__name__}")


def layer_ids(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """Each backbone parameter's layer (BEiT / MAE numbering) and the top layer's number: stage i
    is layer i + 1; parameters before the first stage (patch / position embeddings, class token,
    the ResNet stem) are layer 0, those after the last (final norm) the top layer, as is the head."""
    prefixes = stage_prefixes(backbone)
    top = len(prefixes) + 1
    ids, after = {}, 0
    for name, _ in backbone.named_parameters():
        stage = next((i + 1 for i, prefix in enumerate(prefixes) if name.startswith(prefix)), None)
        if stage is not None:
            after = top
        ids[name] = after if stage is None else stage
    return ids, top


def fine_tune_param_groups(
    backbone: nn.Module, head: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None
) -> list[dict]:
    """Optimizer groups: weight decay on weights, not on biases and norms (``decay_groups``); with
    ``layer_decay``, layer ``i`` of ``L`` (``layer_ids``) trains at ``lr * layer_decay ** (L - i)``."""
    if layer_decay is None:
        return [{**group, "lr": lr} for group in decay_groups([backbone, head], weight_decay)]
    ids, top = layer_ids(backbone)
    named = [(ids[name], param) for name, param in backbone.named_parameters()] + [(top, p) for p in head.parameters()]
    groups: dict[tuple[int, bool], dict] = {}
    for layer, param in named:
        if not param.requires_grad:
            continue
        decayed = param.ndim > 1  # decay_groups' rule: no decay on biases and norm weights
        group = groups.setdefault(
            (layer, decayed),
            {"params": [], "lr": lr * layer_decay ** (top - layer), "weight_decay": weight_decay if decayed else 0.0, DECAYED: decayed},
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def classifier_head(in_features: int, num_classes: int, init_std: float | None = None) -> nn.Linear:
    """A new linear head on pretrained features. ``init_std`` draws its weights from a normal of
    that std truncated at 2 std, its bias 0 (MAE's fine-tuning: 2e-5; None keeps PyTorch's
    default): pretrained features can be far larger than at random init (SimCLR on CIFAR-10: norm
    ~64 against ~0.2), and a default head on them starts confidently wrong."""
    if init_std is not None and not init_std > 0:
        raise ValueError(f"head_init_std must be positive, got {init_std}")
    head = nn.Linear(in_features, num_classes)
    if init_std is not None:
        nn.init.trunc_normal_(head.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
        nn.init.zeros_(head.bias)
    return head


class FineTuner(L.LightningModule):
    """Backbone + linear head trained end to end with cross-entropy; warmup + cosine per step. A
    test sample of ``test_views`` > 1 (multi-view testing) is scored by its views' mean logits;
    ``head_init_std``: ``classifier_head``'s."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        lr: float,
        weight_decay: float,
        optimizer: OptimizerName = "adamw",
        layer_decay: float | None = None,
        warmup_epochs: float = 0.0,
        test_views: int = 1,
        head_init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.head = classifier_head(backbone.num_features, num_classes, head_init_std)
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.backbone(inputs))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        loss = F.cross_entropy(self(inputs), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        self.test_accuracy(per_view(self, inputs, self.hparams.test_views).mean(1), labels)
        self.log("test/acc", self.test_accuracy)

    def configure_optimizers(self):
        hp = self.hparams
        groups = fine_tune_param_groups(self.backbone, self.head, hp.lr, hp.weight_decay, hp.layer_decay)
        return warmup_cosine_config(build_optimizer(hp.optimizer, groups, hp.lr), self.trainer, hp.warmup_epochs)


class FirstView:
    """The first view of a ``ViewAugmentation`` as a single-sample transform (picklable for workers)."""

    def __init__(self, views: ViewAugmentation) -> None:
        self.views = views

    def __call__(self, sample: Any) -> Tensor:
        return self.views(sample)[0]


def fine_tune(
    backbone: nn.Module,
    datamodule: SSLDataModule,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    optimizer: OptimizerName = "adamw",
    layer_decay: float | None = None,
    warmup_epochs: float = 0.0,
    augment: bool = False,
    head_init_std: float | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> float:
    """Test top-1 of a copy of ``backbone`` + a linear head fine-tuned for ``epochs`` on the
    DataModule's labeled training split (only its labeled part in few-label mode), evaluated with
    the final weights; ``backbone`` itself is left untouched. Runs through a Lightning Trainer
    (``trainer_kwargs``: devices, strategy, precision..., so DDP works). Inputs get the evaluation
    transform, or with ``augment`` the first view of the DataModule's ``views`` (the weak view of
    ``WeakStrongViews`` / ``PairedViews``). Hyper-parameters are given, not searched. The test
    split's multi-view samples (``--data.test_clips`` / ``--data.test_crops``) are scored by the
    mean logits of their views. ``head_init_std`` starts the head near zero (``classifier_head``)."""
    L.seed_everything(seed, verbose=False)
    datamodule.setup("fit")
    transform = FirstView(datamodule.views) if augment else datamodule.eval_transform
    labeled = None if datamodule.few_label is None else datamodule.few_label.labeled
    train = Transformed(datamodule.splits.train, transform, labeled)
    batch_size = min(datamodule.batch_size, len(train))
    # The DataModule's loader settings (workers, pinning, bad-file collation); full batches only,
    # so BatchNorm never sees a batch of one.
    loader = datamodule.loader(train, shuffle=True, drop_last=len(train) > batch_size, batch_size=batch_size)
    model = FineTuner(
        copy.deepcopy(backbone), num_classes, lr, weight_decay, optimizer, layer_decay, warmup_epochs, datamodule.test_views, head_init_std
    )
    settings = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = L.Trainer(**{**settings, **(trainer_kwargs or {}), "max_epochs": epochs})
    trainer.fit(model, train_dataloaders=loader)
    (metrics,) = trainer.test(model, dataloaders=datamodule.test_dataloader(), verbose=False)
    return float(metrics["test/acc"])
