"""MAE: masking, patches, the masked loss, the encoder's view of the input, figures, and learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import REPO, against_random_init, fit, fresh_copy
from ssl_kit.inputs import InputSpec
from ssl_kit.losses.mae import MaskedReconstructionLoss
from ssl_kit.methods.figures import FIGURE_MIN_SIDE
from ssl_kit.methods.mae import MAE
from ssl_kit.models.masking import gather_tokens, random_token_mask
from ssl_kit.models.patches import grid_shape, patchify, sincos_grid, unpatchify


def tiny_mae(**kwargs) -> MAE:
    torch.manual_seed(0)
    kwargs = {"backbone": "vit_tiny_patch16_224", "input_spec": InputSpec.image(16), "num_classes": 10, **kwargs}
    return MAE(**kwargs).eval()


# -- masking --------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_masking_hides_exactly_the_requested_fraction_per_sample(ratio):
    batch, tokens = 64, 49
    mask = random_token_mask(batch, tokens, ratio, generator=torch.Generator().manual_seed(1))
    hidden = round(tokens * ratio)
    assert mask.mask.shape == (batch, tokens) and mask.keep.shape == (batch, tokens - hidden)
    assert (mask.mask.sum(dim=1) == hidden).all()
    # keep lists exactly the visible positions, each once
    visible = torch.zeros_like(mask.mask).scatter_(1, mask.keep, True)
    assert torch.equal(visible, ~mask.mask)
    if 0 < hidden < tokens:
        assert len({tuple(row.tolist()) for row in mask.mask}) > batch // 2  # masks differ across samples


def test_restore_is_the_inverse_of_the_shuffle():
    batch, tokens, dim = 8, 16, 5
    mask = random_token_mask(batch, tokens, 0.75, generator=torch.Generator().manual_seed(2))
    shuffle = mask.restore.argsort(dim=1)
    arange = torch.arange(tokens).expand(batch, -1)
    assert torch.equal(shuffle.gather(1, mask.restore), arange)
    assert torch.equal(mask.restore.gather(1, shuffle), arange)
    assert torch.equal(shuffle[:, : mask.keep.shape[1]], mask.keep)
    # [visible tokens, hidden tokens] put back in order with restore gives the original sequence
    sequence = torch.randn(batch, tokens, dim)
    hidden_index = shuffle[:, mask.keep.shape[1] :]
    reordered = torch.cat([gather_tokens(sequence, mask.keep), gather_tokens(sequence, hidden_index)], dim=1)
    assert torch.equal(gather_tokens(reordered, mask.restore), sequence)
    assert mask.mask.gather(1, hidden_index).all() and not mask.mask.gather(1, mask.keep).any()


def test_seeded_figure_mask_is_deterministic():
    model = tiny_mae()
    first = model.random_mask(4, torch.Generator().manual_seed(0))
    second = model.random_mask(4, torch.Generator().manual_seed(0))
    assert torch.equal(first.mask, second.mask) and torch.equal(first.keep, second.keep)


# -- patches --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, patch, grid",
    [((2, 3, 32, 32), 4, (8, 8)), ((2, 1, 16, 40), 8, (2, 5)), ((3, 1, 12, 20), (4, 2), (3, 10)), ((1, 2, 28, 28), 7, (4, 4))],
)
def test_patchify_round_trip_any_channels_and_grid(shape, patch, grid):
    images = torch.randn(shape)
    batch, channels, height, width = shape
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    assert grid_shape((height, width), patch) == grid
    patches = patchify(images, patch)
    assert patches.shape == (batch, grid[0] * grid[1], ph * pw * channels)
    assert torch.equal(unpatchify(patches, grid, patch, channels), images)
    # token r * cols + c is the (r, c) patch, values ordered (row, col, channel)
    r, c = grid[0] - 1, grid[1] // 2
    expected = images[:, :, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw].permute(0, 2, 3, 1).reshape(batch, -1)
    assert torch.equal(patches[:, r * grid[1] + c], expected)


def test_patchify_rejects_a_patch_that_does_not_tile():
    with pytest.raises(ValueError, match="does not tile"):
        patchify(torch.zeros(1, 1, 10, 12), 4)


def test_patch_order_matches_the_vit_patch_embedding():
    """Reconstruction targets line up with encoder tokens: timm's conv patch embedding equals a
    linear map applied to our patch vectors, token by token."""
    vit = tiny_mae(input_spec=InputSpec.image(32)).backbone
    images = torch.randn(2, 3, 32, 32)
    proj = vit.patch_embed.proj
    weight = proj.weight.permute(0, 2, 3, 1).reshape(proj.out_channels, -1)  # (D, ph * pw * C)
    expected = patchify(images, 4) @ weight.T + proj.bias
    assert torch.allclose(vit.patch_embed(images), expected, atol=1e-5)


def test_sincos_2d_on_a_non_square_grid():
    embedding = sincos_grid(32, (3, 5))
    assert embedding.shape == (15, 32)
    assert len({tuple(row.tolist()) for row in embedding}) == 15
    # the first half encodes the row, the second half the column
    assert torch.equal(embedding[0, :16], embedding[4, :16]) and not torch.equal(embedding[0, 16:], embedding[4, 16:])
    assert torch.equal(embedding[0, 16:], embedding[5, 16:]) and not torch.equal(embedding[0, :16], embedding[5, :16])


# -- the loss -------------------------------------------------------------------------------
def _loss_inputs(seed=0, batch=4, tokens=16, dim=12):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(batch, tokens, dim, generator=generator)
    target = torch.randn(batch, tokens, dim, generator=generator) * 3 + 1
    mask = random_token_mask(batch, tokens, 0.75, generator=generator).mask
    return pred, target, mask


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_ignores_visible_patches(norm_pix):
    criterion = MaskedReconstructionLoss(norm_pix_loss=norm_pix)
    pred, target, mask = _loss_inputs()
    base = criterion(pred, target, mask)
    changed_visible = pred.clone()
    changed_visible[~mask] += torch.randn_like(changed_visible[~mask]) * 10
    assert criterion(changed_visible, target, mask).item() == base.item()
    changed_target = target.clone()
    changed_target[~mask] = 0.0
    assert criterion(pred, changed_target, mask).item() == base.item()
    changed_hidden = pred.clone()
    b, n = mask.nonzero()[0]
    changed_hidden[b, n] += 1.0
    assert criterion(changed_hidden, target, mask).item() != pytest.approx(base.item(), rel=1e-6)
    # and the gradient reaches hidden patches only
    pred = pred.clone().requires_grad_(True)
    criterion(pred, target, mask).backward()
    assert not pred.grad[~mask].any() and pred.grad[mask].abs().sum(-1).gt(0).all()


def test_norm_pix_target_matches_explicit_formula():
    pred, target, mask = _loss_inputs(seed=3)
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for n in range(pred.shape[1]):
            if not mask[b, n]:
                continue
            t = target[b, n].double()
            mean = t.sum() / len(t)
            var = ((t - mean) ** 2).sum() / (len(t) - 1)  # unbiased, as in the MAE reference code
            normalised = (t - mean) / math.sqrt(var + 1e-6)
            total += ((pred[b, n].double() - normalised) ** 2).mean().item()
            count += 1
    loss = MaskedReconstructionLoss(norm_pix_loss=True)(pred, target, mask)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_videomae_norm_pix_target_is_per_channel_with_eps_on_the_std():
    """VideoMAE's target: each channel of a tubelet standardised on its own, ``(t - mean_c) /
    (std_c + eps)`` (unbiased), values channel-last in the patch vector; image MAE pools the channels."""
    gen = torch.Generator().manual_seed(5)
    channels, values = 3, 8
    pred = torch.randn(2, 4, values * channels, generator=gen)
    target = torch.randn(2, 4, values * channels, generator=gen) * torch.tensor([1.0, 5.0, 0.2]).repeat(values) + torch.tensor([0.0, 3.0, -1.0]).repeat(values)
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    total, count = 0.0, 0
    for b in range(2):
        for n in range(4):
            if mask[b, n]:
                t = target[b, n].double().reshape(values, channels)
                normalised = (t - t.mean(0)) / (t.std(0) + 1e-6)  # torch.std is unbiased
                total += ((pred[b, n].double().reshape(values, channels) - normalised) ** 2).mean().item()
                count += 1
    video = MaskedReconstructionLoss(norm_pix_loss=True, norm_channels=channels)(pred, target, mask)
    assert video.item() == pytest.approx(total / count, rel=1e-5)
    # pooling the channels gives another target: they have their own offsets and scales here
    image_target = MaskedReconstructionLoss(norm_pix_loss=True).target(target)
    assert (image_target - MaskedReconstructionLoss(norm_pix_loss=True, norm_channels=channels).target(target)).abs().max() > 0.5
    from ssl_kit.methods import MAE

    model = MAE(backbone="video_vit_tiny", input_spec=InputSpec.video(4, 16), backbone_kwargs={"depth": 1})
    assert model.criterion.norm_channels == 3 and tiny_mae().criterion.norm_channels is None


def test_without_norm_pix_the_loss_is_plain_mse_on_hidden_patches():
    pred, target, mask = _loss_inputs(seed=4)
    expected = ((pred[mask] - target[mask]) ** 2).mean()
    loss = MaskedReconstructionLoss(norm_pix_loss=False)(pred, target, mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# -- the encoder and decoder ----------------------------------------------------------------
def test_encoder_sees_only_visible_patches():
    model = tiny_mae()
    images = torch.randn(3, 3, 16, 16)
    mask = model.random_mask(3, torch.Generator().manual_seed(0))
    latent = model.encode(images, mask)
    assert latent.shape == (3, 1 + 4, model.backbone.embed_dim)  # class token + 4 of 16 patches
    hidden = mask.mask.unsqueeze(-1)
    noise = torch.randn_like(model.patches.patchify(images)) * 5
    scrambled = model.patches.unpatchify(torch.where(hidden, noise, model.patches.patchify(images)))
    assert not torch.equal(scrambled, images)
    assert torch.allclose(model.encode(scrambled, mask), latent, atol=1e-6)
    # the decoder's predictions depend on the visible pixels only, too
    assert torch.allclose(model.decoder(model.encode(scrambled, mask), mask), model.decoder(latent, mask), atol=1e-6)
    # while changing a visible patch changes the encoding
    visible_changed = model.patches.unpatchify(torch.where(hidden, model.patches.patchify(images), noise))
    assert not torch.allclose(model.encode(visible_changed, mask), latent, atol=1e-3)


def test_training_loss_shapes_and_gradients_reach_encoder_and_decoder():
    model = tiny_mae().train()
    loss, features = model.training_loss([torch.randn(4, 3, 16, 16)])
    assert loss.ndim == 0 and features.shape == (4, model.feature_dim)
    loss.backward()
    assert model.decoder.mask_token.grad.abs().sum() > 0
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.decoder.pred.weight.grad.abs().sum() > 0


def test_reconstruction_pastes_visible_patches():
    model = tiny_mae(norm_pix_loss=True)
    images = torch.randn(2, 3, 16, 16)
    mask = model.random_mask(2, torch.Generator().manual_seed(0))
    recon = model.reconstruct(images, mask)
    visible = ~mask.mask
    assert torch.equal(model.patches.patchify(recon)[visible], model.patches.patchify(images)[visible])
    assert not torch.allclose(model.patches.patchify(recon)[mask.mask], model.patches.patchify(images)[mask.mask])


@pytest.mark.parametrize("full", [False, True])
def test_probe_features_and_isolation(full):
    """The probe trains on the pooled feature of the masked pass (default) or of a no-grad pass over
    the full images; either way its loss sends no gradient into the backbone."""
    model = tiny_mae(probe_full_images=full).train()
    images = torch.randn(4, 3, 16, 16)
    torch.manual_seed(5)
    loss, features = model.training_loss([images])
    if full:
        assert torch.allclose(features, model.backbone(images), atol=1e-5) and not features.requires_grad
    else:
        torch.manual_seed(5)
        mask = model.random_mask(4)
        assert torch.allclose(features, model.backbone.forward_head(model.encode(images, mask), pre_logits=True), atol=1e-6)
    (0.0 * loss + model.probe_loss(features.detach(), torch.tensor([0, 1, -1, 3]))).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.backbone.parameters())
    assert model.probe[1].weight.grad.abs().sum() > 0


def test_encoder_position_embeddings_are_fixed_sincos():
    model = tiny_mae()
    pos = model.backbone.pos_embed
    assert not pos.requires_grad
    assert torch.equal(pos[0, 1:], sincos_grid(pos.shape[-1], (4, 4))) and not pos[0, 0].any()
    assert tiny_mae(fixed_pos_embed=False).backbone.pos_embed.requires_grad


def test_mae_needs_a_vit():
    with pytest.raises(TypeError, match="ViT"):
        MAE(backbone="resnet18", input_spec=InputSpec.image(16))


@pytest.mark.parametrize(
    "config, image_size, grid",
    [("mae_digits.yaml", 16, (4, 4)), ("mae_mnist.yaml", 28, (7, 7)), ("mae_cifar10.yaml", 32, (8, 8))],
)
def test_shipped_configs_build_a_tiling_vit(config, image_size, grid):
    """The configs' ViT patch tiles their image size (MNIST 28 px: 4 px patches, 7x7)."""
    spec = yaml.safe_load((REPO / "configs" / config).read_text())
    assert spec["model"]["class_path"] == "ssl_kit.methods.mae.MAE"
    assert spec["data"]["init_args"]["image_size"] == image_size
    views = spec["data"]["init_args"]["views"]["init_args"]
    assert views["num_views"] == 1 and views["jitter_prob"] == 0 and views["grayscale_prob"] == 0
    model = MAE(input_spec=InputSpec.image(image_size), **spec["model"]["init_args"])
    assert model.patches.grid == grid
    loss, _ = model.training_loss([torch.randn(2, 3, image_size, image_size)])
    assert torch.isfinite(loss)


# -- the CLI: figures and learning ----------------------------------------------------------
@pytest.mark.slow
def test_reconstruction_png_is_written_each_validation_epoch(tmp_path):
    rows = 4
    cli = fit(
        "mae_digits.yaml", tmp_path, "--trainer.max_epochs", "2", "--data.image_size", "16", "--data.batch_size", "16",
        "--trainer.num_sanity_val_steps", "1",  # (TINY: 2 train and 2 val batches per epoch)
        "--model.num_reconstructions", str(rows),
    )  # fmt: skip
    folder = tmp_path / "csv" / "version_0" / "reconstructions"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch0000.png", "epoch0001.png"]  # none from the sanity check
    side = 16 * (FIGURE_MIN_SIDE // 16)  # tiny images are zoomed for display
    pad = 2
    png = np.asarray(Image.open(folder / "epoch0001.png").convert("RGB"))
    assert png.shape == (rows * (side + pad) + pad, 3 * (side + pad) + pad, 3)
    # rows are the first validation images: the first column is the de-normalised original
    images = next(iter(cli.datamodule.val_dataloader()[1]))[0][:rows]
    datamodule = cli.datamodule
    original = (images * torch.tensor(datamodule.std).view(1, -1, 1, 1) + torch.tensor(datamodule.mean).view(1, -1, 1, 1)).clamp(0, 1)
    zoom = side // 16

    def panel(row, column):
        top, left = pad + row * (side + pad), pad + column * (side + pad)
        return png[top : top + side : zoom, left : left + side : zoom].astype(np.int16)

    for row in range(rows):
        expected = (original[row].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.int16)
        assert np.abs(panel(row, 0) - expected).max() <= 1
        mask = cli.model.random_mask(rows, torch.Generator().manual_seed(0)).mask[row].reshape(4, 4)
        cells = np.kron(mask.numpy(), np.ones((4, 4), dtype=bool))
        assert (panel(row, 1)[cells] == 128).all()  # hidden patches grey
        assert np.array_equal(panel(row, 1)[~cells], panel(row, 0)[~cells])
        assert np.array_equal(panel(row, 2)[~cells], panel(row, 0)[~cells])  # visible patches pasted
    # and logged to TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("val/reconstructions")) == 2


# Digits at 16 px, 4 px patches (4x4 grid: 4 visible patches per image). Optimizer steps matter more
# than samples for a short MAE run, so small batches: 3 epochs of batch 32 (105 steps); validation
# (the kNN monitor) only at the end.
LEARN = [
    "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "3", "--trainer.num_sanity_val_steps", "0",
    "--trainer.limit_train_batches", "1.0", "--trainer.limit_val_batches", "1.0",
    "--data.image_size", "16", "--data.batch_size", "32",
    "--model.lr", "0.001", "--model.warmup_epochs", "0.3",
]  # fmt: skip


def masked_val_loss(model: MAE, images: torch.Tensor) -> float:
    model.eval()
    mask = model.random_mask(len(images), torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = model.decoder(model.encode(images, mask), mask)
        return model.criterion(pred, model.patches.patchify(images), mask.mask).item()


@pytest.mark.slow
def test_mae_learns_beyond_random_init_features(tmp_path):
    """A short run on the digits: the masked reconstruction loss on validation images drops well
    below both the random-init model's and the best constant prediction's (0 in norm-pix units),
    and the kNN accuracy of the trained ViT beats the same ViT at random init."""
    cli = fit("mae_digits.yaml", tmp_path, *LEARN)
    trained, random_init = against_random_init(cli, "mae_digits")["knn"]
    _, val = cli.datamodule.val_dataloader()
    fresh = fresh_copy(cli.model)

    images = torch.cat([batch[0] for batch in val])
    mask = cli.model.random_mask(len(images), torch.Generator().manual_seed(0)).mask
    constant = cli.model.criterion(torch.zeros_like(cli.model.patches.patchify(images)), cli.model.patches.patchify(images), mask).item()
    loss_trained, loss_random = masked_val_loss(cli.model, images), masked_val_loss(fresh, images)
    print(
        f"MAE: kNN trained {trained:.3f} vs random init {random_init:.3f}; masked val loss trained "
        f"{loss_trained:.3f}, random init {loss_random:.3f}, constant prediction {constant:.3f}"
    )
    assert loss_trained <= 0.5 * loss_random
    assert loss_trained <= 0.9 * constant
    assert trained >= random_init + 0.1
