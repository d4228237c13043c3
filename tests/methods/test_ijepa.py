"""I-JEPA: the multi-block sampler (count, sizes, aspect ratios, context without targets, equal
counts, minimum context, tubes on video grids, non-square grids) over many seeded draws, the loss
against its formula, the predictor's isolation from target pixels, the EMA target encoder (no
gradient, no optimizer group, its schedule by optimizer step), the shipped configs, a short CLI
run. No learning check yet: on MNIST at 28 px (117 steps, a 6-block ViT-Tiny) I-JEPA stays below
random-init features (measured: linear 0.713 vs 0.766), and on the scikit-learn digits at 16 px
too (153 steps, configs/ijepa_digits.yaml: kNN 0.449 vs 0.530, linear 0.886 vs 0.905); see issue 18.

No 2-process DDP test: I-JEPA computes no batch statistic (its loss is a per-rank mean of
per-token terms, as in the official code, and DDP averages the gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch import Tensor

from helpers import REPO, TINY_RUN, configured_optimizer, fit, fresh_copy
from ssl_kit.inputs import InputSpec
from ssl_kit.losses.ijepa import LatentPredictionLoss
from ssl_kit.methods.ijepa import IJEPA
from ssl_kit.methods.momentum import momentum_at
from ssl_kit.models.masking import multi_block_masks, multi_block_shape

# --------------------------------------------------------------------------------------------
# the multi-block sampler
# --------------------------------------------------------------------------------------------
SEEDS = range(200)


def rectangle(positions: list[int], cols: int) -> tuple[int, int] | None:
    """(height, width) when the spatial ``positions`` fill exactly one rectangle, else None."""
    rows_, cols_ = {p // cols for p in positions}, {p % cols for p in positions}
    height, width = max(rows_) - min(rows_) + 1, max(cols_) - min(cols_) + 1
    return (height, width) if len(set(positions)) == height * width == len(positions) else None


def possible_shapes(rows: int, cols: int, scale: tuple[float, float], aspect: tuple[float, float]) -> set[tuple[int, int]]:
    """Every (height, width) the I-JEPA rule can give, on a fine grid of scales and aspect ratios:
    area = scale * rows * cols, height = round(sqrt(area * aspect)), width = round(sqrt(area / aspect))."""
    shapes = set()
    steps = 120
    for i in range(steps + 1):
        for j in range(steps + 1):
            s = scale[0] + (scale[1] - scale[0]) * i / steps
            a = aspect[0] + (aspect[1] - aspect[0]) * j / steps
            area = s * rows * cols
            shapes.add((max(1, round(math.sqrt(area * a))), max(1, round(math.sqrt(area / a)))))
    return shapes


@pytest.mark.parametrize("grid", [(8, 8), (7, 7), (8, 12), (16, 16)])
def test_target_blocks_have_the_count_size_and_aspect_ratio_of_the_recipe(grid):
    rows, cols = grid
    allowed = possible_shapes(rows, cols, (0.15, 0.2), (0.75, 1.5))
    seen = set()
    for seed in SEEDS:
        masks = multi_block_masks(6, grid, generator=torch.Generator().manual_seed(seed))
        assert masks.targets.shape[:2] == (6, 4)  # 4 target blocks per sample
        shapes = {rectangle(block.tolist(), cols) for sample in masks.targets for block in sample}
        assert len(shapes) == 1 and None not in shapes  # one rectangle shape for the whole batch
        shape = shapes.pop()
        assert shape in allowed, (seed, shape)
        seen.add(shape)
        assert all(block.tolist() == sorted(block.tolist()) for sample in masks.targets for block in sample)
    assert len(seen) >= 2  # the shape is drawn, not fixed
    if grid == (16, 16):  # on a fine grid rounding is small: scale and aspect ratio close to their ranges
        assert all(0.13 <= h * w / 256 <= 0.22 and 0.7 <= h / w <= 1.7 for h, w in seen)


def test_target_positions_cover_the_whole_grid():
    """Blocks may touch the last row and column (the official sampler never places them there)."""
    counts = torch.zeros(64)
    for seed in range(50):
        targets = multi_block_masks(8, (8, 8), generator=torch.Generator().manual_seed(seed)).targets
        counts += torch.bincount(targets.flatten(), minlength=64)
    assert (counts > 0).all()


@pytest.mark.parametrize("grid, min_context", [((8, 8), 10), ((7, 7), 10), ((8, 12), 10), ((6, 6), 14)])
def test_context_excludes_every_target_token_and_keeps_the_minimum(grid, min_context):
    rows, cols = grid
    for seed in SEEDS:
        masks = multi_block_masks(16, grid, min_context=min_context, generator=torch.Generator().manual_seed(seed))
        context, targets = masks.context, masks.targets
        assert context.shape[0] == 16 and context.shape[1] >= min_context  # equal count across the batch
        for sample, blocks in zip(context.tolist(), targets):
            assert sample == sorted(set(sample))  # distinct, sorted
            assert not set(sample) & set(blocks.flatten().tolist())
            # inside one square-ish context block of scale 0.85-1.0 (cut to the grid on non-square grids)
            height = max(p // cols for p in sample) - min(p // cols for p in sample) + 1
            width = max(p % cols for p in sample) - min(p % cols for p in sample) + 1
            assert height <= min(rows, round(math.sqrt(rows * cols))) and width <= cols


def test_context_block_shape_on_square_and_non_square_grids():
    assert multi_block_shape(8, 8, 0.85, 1.0) == (7, 7) and multi_block_shape(8, 8, 1.0, 1.0) == (8, 8)
    # 8 x 12 spectrogram grid: a square block of 0.85 x 96 tokens is 9 x 9, cut to 8 rows and widened to keep its area
    assert multi_block_shape(8, 12, 0.85, 1.0) == (8, 10) and multi_block_shape(8, 12, 1.0, 1.0) == (8, 12)
    assert multi_block_shape(12, 8, 0.85, 1.0) == (10, 8)
    assert multi_block_shape(4, 4, 0.01, 1.0) == (1, 1)  # never empty


def test_contexts_are_cut_to_the_smallest_in_the_batch():
    """Each sample alone keeps its whole context; in a batch, every context has the size of the
    smallest one, a subset of the sample's own context."""
    generator = torch.Generator().manual_seed(3)
    sizes = [multi_block_masks(1, (8, 8), generator=generator).context.shape[1] for _ in range(40)]
    assert len(set(sizes)) > 1  # contexts differ in size ...
    batch = multi_block_masks(64, (8, 8), generator=torch.Generator().manual_seed(3)).context
    assert batch.shape[1] <= sorted(sizes)[len(sizes) // 4]  # ... and a batch keeps the small end


def test_impossible_minimum_context_raises():
    with pytest.raises(ValueError, match="min_context"):
        multi_block_masks(4, (4, 4), min_context=15, max_attempts=20)
    with pytest.raises(ValueError, match="grid"):
        multi_block_masks(4, (16,))


@pytest.mark.parametrize("grid", [(4, 4, 4), (2, 6, 8)])
def test_video_blocks_are_tubes_over_every_time_slice(grid):
    time, rows, cols = grid
    spatial = rows * cols
    for seed in range(50):
        masks = multi_block_masks(4, grid, min_context=10, generator=torch.Generator().manual_seed(seed))
        assert masks.context.shape[1] >= 10
        for sample, blocks in zip(masks.context.tolist(), masks.targets):
            # the same spatial positions in every time slice
            slices = [sorted(p % spatial for p in sample if p // spatial == t) for t in range(time)]
            assert all(s == slices[0] for s in slices) and len(sample) == time * len(slices[0])
            targets = set(blocks.flatten().tolist())
            assert not set(sample) & targets
            for block in blocks.tolist():
                per_slice = [sorted(p % spatial for p in block if p // spatial == t) for t in range(time)]
                assert all(s == per_slice[0] for s in per_slice) and rectangle(per_slice[0], cols) is not None


def test_sampler_is_seeded_and_moves_to_the_device():
    a = multi_block_masks(4, (8, 8), generator=torch.Generator().manual_seed(1))
    b = multi_block_masks(4, (8, 8), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)
    assert a.context.dtype == torch.long and a.context.device.type == "cpu"


# --------------------------------------------------------------------------------------------
# the loss against its formula
# --------------------------------------------------------------------------------------------
def formula_loss(pred: Tensor, target: Tensor, kind: str) -> float:
    """Per token: target standardised over its features (biased variance, eps 1e-5); smooth L1
    (0.5 d^2 for |d| < 1, |d| - 0.5 otherwise) or d^2; the mean over every value."""
    values = []
    for p_token, t_token in zip(pred.reshape(-1, pred.shape[-1]).tolist(), target.reshape(-1, target.shape[-1]).tolist()):
        mean = sum(t_token) / len(t_token)
        var = sum((t - mean) ** 2 for t in t_token) / len(t_token)
        for p, t in zip(p_token, t_token):
            d = p - (t - mean) / math.sqrt(var + 1e-5)
            values.append((0.5 * d * d if abs(d) < 1 else abs(d) - 0.5) if kind == "smooth_l1" else d * d)
    return sum(values) / len(values)


@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
def test_loss_matches_the_formula(kind):
    gen = torch.Generator().manual_seed(0)
    pred = 1.5 * torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)  # (batch, blocks, tokens, dim)
    target = 3.0 + 2.0 * torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    got = LatentPredictionLoss(kind)(pred, target).item()
    assert got == pytest.approx(formula_loss(pred, target, kind), rel=1e-10)
    normalised = torch.nn.functional.layer_norm(target, (5,))
    differences = (pred - normalised).abs()
    assert (differences < 1).any() and (differences > 1).any()  # both smooth-L1 branches are exercised


def test_loss_sends_no_gradient_to_the_targets_and_rejects_unknown_kinds():
    pred = torch.randn(2, 4, 6, requires_grad=True)
    target = torch.randn(2, 4, 6, requires_grad=True)
    LatentPredictionLoss()(pred, target).backward()
    assert pred.grad.abs().sum() > 0 and target.grad is None
    with pytest.raises(ValueError, match="smooth_l1"):
        LatentPredictionLoss("l1")


# --------------------------------------------------------------------------------------------
# the method on tiny ViTs
# --------------------------------------------------------------------------------------------
SPECTROGRAM = InputSpec("audio", (64, 101), 1)
TINY_PREDICTOR = {"predictor_embed_dim": 48, "predictor_depth": 1}


#: Depth-1 encoders: an image ViT with timm's class token (a prefix token) on an 8 x 8 grid, a
#: spectrogram ViT as the configs build it (no class token, average pooling; 8 x 12 grid), a video
#: ViT (4 x 4 x 4 grid); and a batch of inputs for each.
TINY_BACKBONES = {
    "image": ("vit_tiny_patch16_224", InputSpec.image(32), {}, (4, 3, 32, 32)),
    "spectrogram": ("vit_tiny_patch16_224", SPECTROGRAM, {"patch_size": [8, 8], "class_token": False, "global_pool": "avg"}, (4, 1, 64, 101)),
    "video": ("video_vit_tiny", InputSpec.video(8, 32), {"patch_size": 8}, (4, 3, 8, 32, 32)),
}


def tiny_ijepa(modality: str = "image", **kwargs) -> IJEPA:
    torch.manual_seed(0)
    backbone, spec, backbone_kwargs, _ = TINY_BACKBONES[modality]
    return IJEPA(backbone=backbone, input_spec=spec, backbone_kwargs={"depth": 1, **backbone_kwargs}, **TINY_PREDICTOR, **kwargs)


def with_changed_tokens(model: IJEPA, inputs: Tensor, tokens: Tensor) -> Tensor:
    """``inputs`` with the pixels of patch token ``tokens[b]`` of each sample ``b`` replaced by noise."""
    patches = model.patches.patchify(inputs)
    rows = torch.arange(len(tokens))
    patches[rows, tokens] = 5 * torch.randn_like(patches[rows, tokens])
    changed = inputs.clone()
    covered = model.patches.unpatchify(patches)
    changed[(...,) + tuple(slice(0, n) for n in covered.shape[2:])] = covered
    return changed


@pytest.mark.parametrize("modality", list(TINY_BACKBONES))
def test_predictions_depend_on_context_pixels_only_and_targets_on_the_full_input(modality):
    model, shape = tiny_ijepa(modality).eval(), TINY_BACKBONES[modality][-1]
    inputs = torch.randn(*shape)
    masks = model.block_masks(shape[0], torch.Generator().manual_seed(0))
    predictions, _ = model.predict(inputs, masks)
    targets = model.target_tokens(inputs, masks)
    assert predictions.shape == targets.shape == (*masks.targets.shape, model.patches.embed_dim)

    target_only = masks.targets[:, 0, 0]  # a target token: never in the context
    changed = with_changed_tokens(model, inputs, target_only)
    assert not torch.equal(changed, inputs)
    assert torch.equal(model.predict(changed, masks)[0], predictions)  # not a bit moves
    assert not torch.allclose(model.target_tokens(changed, masks), targets, atol=1e-3)  # the target encoder sees it

    # a context patch moves the predictions (little at initialisation: the predictor starts with small weights)
    in_context = with_changed_tokens(model, inputs, masks.context[:, 0])
    assert (model.predict(in_context, masks)[0] - predictions).abs().max() > 1e-5


def test_targets_are_the_target_encoders_patch_tokens_without_the_class_token():
    model = tiny_ijepa()
    assert model.patches.num_prefix_tokens == 1
    inputs = torch.randn(3, 3, 32, 32)
    masks = model.block_masks(3, torch.Generator().manual_seed(2))
    full = model.target_backbone.forward_features(inputs)  # timm: class token first, then the 64 patch tokens
    assert full.shape[1] == 65
    targets = model.target_tokens(inputs, masks)
    for b in range(3):
        for t in range(masks.targets.shape[1]):
            assert torch.allclose(targets[b, t], full[b, 1 + masks.targets[b, t]], atol=1e-6)


def test_predictor_queries_carry_the_target_positions():
    """Same context, different target positions: different predictions (fixed sin-cos embeddings)."""
    model = tiny_ijepa().eval()
    context = torch.randn(1, 5, model.patches.embed_dim)
    context_index = torch.tensor([[0, 1, 2, 3, 4]])
    first = model.predictor(context, context_index, torch.tensor([[[20, 21]]]))
    second = model.predictor(context, context_index, torch.tensor([[[21, 20]]]))
    assert torch.allclose(first[0, 0, 0], second[0, 0, 1], atol=1e-6) and not torch.allclose(first, second, atol=1e-3)


@pytest.mark.parametrize("modality", list(TINY_BACKBONES))
def test_target_encoder_gets_no_gradient_and_is_in_no_optimizer_group(modality):
    model, shape = tiny_ijepa(modality).train(), TINY_BACKBONES[modality][-1]
    loss, features = model.training_loss([torch.randn(*shape)])
    assert torch.isfinite(loss) and features.shape == (shape[0], model.feature_dim)
    loss.backward()
    target = list(model.target_backbone.parameters())
    assert target and all(not p.requires_grad and p.grad is None for p in target)
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.predictor.mask_token.grad.abs().sum() > 0 and model.predictor.proj.weight.grad.abs().sum() > 0

    optimised = [p for group in configured_optimizer(model).param_groups for p in group["params"]]
    ids = {id(p) for p in optimised}
    assert len(ids) == len(optimised) and not ids & {id(p) for p in target}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}  # backbone, predictor, probe
    # the position embeddings are fixed sin-cos, frozen, and the target encoder starts as an exact copy
    assert not model.backbone.pos_embed.requires_grad and id(model.backbone.pos_embed) not in ids
    for t, o in zip(model.target_backbone.state_dict().values(), model.backbone.state_dict().values()):
        assert torch.equal(t, o)


@pytest.mark.parametrize("full", [False, True])
def test_probe_features(full):
    """Default: the pooled context-encoder output of the same pass; ``probe_full_inputs``: a no-grad
    pass of the online backbone over the full inputs, what the probe is evaluated on."""
    model = tiny_ijepa("spectrogram", probe_full_inputs=full).eval()
    inputs = torch.randn(3, 1, 64, 101)
    torch.manual_seed(4)
    _, features = model.training_loss([inputs])
    if full:
        assert torch.allclose(features, model.backbone(inputs), atol=1e-5) and not features.requires_grad
    else:
        torch.manual_seed(4)
        masks = model.block_masks(3)
        expected = model.patches.pooled(model.patches.tokens(inputs, keep=masks.context))
        assert torch.allclose(features, expected, atol=1e-6)


def test_predictor_width_depth_and_heads():
    model = tiny_ijepa(predictor_num_heads=4)
    assert model.predictor.embed.out_features == 48 and len(model.predictor.blocks) == 1
    assert model.predictor.blocks[0].attn.num_heads == 4
    assert tiny_ijepa().predictor.blocks[0].attn.num_heads == model.backbone.blocks[0].attn.num_heads == 3  # official default
    with pytest.raises(ValueError, match="predictor_num_heads"):
        tiny_ijepa(predictor_num_heads=5)


def test_ema_follows_the_official_linear_schedule_by_optimizer_step():
    """Official: m_i = 0.996 + i * (1 - 0.996) / total for the i-th optimizer step (from 0)."""
    model = tiny_ijepa()
    ema = model.ema
    assert (ema.base, ema.final, ema.schedule, ema.horizon) == (0.996, 1.0, "linear", 1.0)
    total = 100
    name = "blocks.0.attn.qkv.weight"
    online, target = model.backbone.get_parameter(name), model.target_backbone.get_parameter(name)
    with torch.no_grad():
        online.add_(1.0)
    ema.start(0)
    assert ema.step(0, lambda s: s / total) is False  # no optimizer step yet
    gap = 1.0
    for step in (1, 2, 26, 51, 100, 101, 150):
        assert ema.step(step, lambda s: s / total) is True
        assert ema.momentum == pytest.approx(min(1.0, 0.996 + (step - 1) * 0.004 / total), abs=1e-12)
        gap *= ema.momentum
        assert torch.allclose(online - target, torch.full_like(target, gap), atol=1e-5)
    assert ema.step(150, lambda s: s / total) is False  # a second micro-batch of the same optimizer step


# --------------------------------------------------------------------------------------------
# the shipped configs and the CLI
# --------------------------------------------------------------------------------------------
CONFIGS = {
    "ijepa_digits.yaml": (InputSpec.image(16), (8, 8)),
    "ijepa_mnist.yaml": (InputSpec.image(28), (7, 7)),
    "ijepa_cifar10_cpu.yaml": (InputSpec.image(32), (8, 8)),
    "ijepa_synthetic_audio.yaml": (SPECTROGRAM, (8, 12)),
    "ijepa_fsdd.yaml": (SPECTROGRAM, (8, 12)),
    "ijepa_moving_digits.yaml": (InputSpec.video(8, 32), (4, 4, 4)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_shipped_configs_follow_the_recipe_and_build(config):
    spec, grid = CONFIGS[config]
    cfg = yaml.safe_load((REPO / "configs" / config).read_text())
    args = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"] in ("IJEPA", "ssl_kit.methods.ijepa.IJEPA")
    assert args["optimizer"] == "adamw" and args["weight_decay"] == 0.04 and args["loss"] == "smooth_l1"
    assert args["num_targets"] == 4 and args["target_scale"] == [0.15, 0.2] and args["context_scale"] == [0.85, 1.0]
    views = cfg["data"]["init_args"]["views"]["init_args"]
    assert views["num_views"] == 1  # one view; the crop is its only augmentation
    assert all(views.get(key, 0) == 0 for key in ("jitter_prob", "grayscale_prob", "noise_prob", "mixup_alpha", "gain_db"))
    if spec.modality != "video":  # as the official encoder: no class token, average pooling
        assert args["backbone_kwargs"]["class_token"] is False and args["backbone_kwargs"]["global_pool"] == "avg"
    model = IJEPA(input_spec=spec, **{**args, "backbone_kwargs": {**args["backbone_kwargs"], "depth": 1}})
    assert model.patches.grid == grid and model.patches.num_prefix_tokens == 0
    masks = model.block_masks(8, torch.Generator().manual_seed(0))
    assert masks.context.shape[1] >= args["min_context"]


@pytest.fixture(scope="module")
def tiny_digits_run(tmp_path_factory):
    """A tiny run of ijepa_digits.yaml: 4 batches with 2-batch gradient accumulation (2 optimizer
    steps), the EMA updates counted."""
    import ssl_kit.methods.momentum as momentum_module

    calls: list[float] = []
    original = momentum_module.ema_update
    momentum_module.ema_update = lambda t, o, m: (calls.append(m), original(t, o, m))[1]
    try:
        cli = fit(
            "ijepa_digits.yaml", tmp_path_factory.mktemp("ijepa_digits"),
            "--data.image_size", "16", "--data.batch_size", "16", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "4", "--trainer.accumulate_grad_batches", "2",
            base=TINY_RUN,
        )  # fmt: skip
    finally:
        momentum_module.ema_update = original
    return cli, calls


def test_cli_run_trains_and_steps_the_ema_once_per_optimizer_step(tiny_digits_run):
    cli, calls = tiny_digits_run
    model, trainer = cli.model, cli.trainer
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/knn_acc" in trainer.callback_metrics and "val/probe_acc" in trainer.callback_metrics
    assert model.patches.grid == (8, 8) and model.patches.num_prefix_tokens == 0
    # 2 optimizer steps -> 2 EMA updates, with the momentum of steps 0 and 1 of 2
    assert calls == [pytest.approx(momentum_at(0, 0 / 2, 0.996, 1.0, "linear")), pytest.approx(momentum_at(1, 1 / 2, 0.996, 1.0, "linear"))]
    assert model.ema.last_step == 2
    # the target encoder moved away from its initial copy, but not to the online encoder
    name = "blocks.0.attn.qkv.weight"
    online, target = model.backbone.get_parameter(name), model.target_backbone.get_parameter(name)
    initial = fresh_copy(model).target_backbone.get_parameter(name)
    assert not torch.equal(target, initial) and not torch.equal(target, online)
