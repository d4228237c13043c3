"""Every method on every modality: the image methods run unchanged on spectrograms and clips
through the shipped configs; MAE becomes Audio-MAE (non-square spectrogram grid) and VideoMAE
(tubelets, tube masking) through one token interface; self-training takes a weak/strong pair of
audio or video views."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from helpers import TINY_RUN, fit
from ssl_kit.inputs import InputSpec
from ssl_kit.methods import MAE, MSN
from ssl_kit.methods.figures import reconstruction_grid
from ssl_kit.models.tokens import ImageViTTokens, VideoViTTokens, patch_tokens
from ssl_kit.transforms import AudioViews, PairedViews, VideoViews

AUDIO_CONFIGS = [
    "barlow_twins_synthetic_audio.yaml",
    "moco_v3_synthetic_audio.yaml",
    "msn_synthetic_audio.yaml",
    "mae_synthetic_audio.yaml",
    "mean_teacher_synthetic_audio.yaml",
    "data2vec2_synthetic_audio.yaml",
    "byol_synthetic_audio.yaml",
    "vicreg_synthetic_audio.yaml",
    "ijepa_synthetic_audio.yaml",
    "dino_synthetic_audio.yaml",
]
VIDEO_CONFIGS = [
    "barlow_twins_moving_digits.yaml",
    "moco_v3_moving_digits.yaml",
    "msn_moving_digits.yaml",
    "mae_moving_digits.yaml",
    "mean_teacher_moving_digits.yaml",
    "data2vec2_moving_digits.yaml",
    "byol_moving_digits.yaml",
    "vicreg_moving_digits.yaml",
    "ijepa_moving_digits.yaml",
    "dino_moving_digits.yaml",
]


@pytest.mark.parametrize("config", AUDIO_CONFIGS + VIDEO_CONFIGS)
@pytest.mark.slow
def test_each_method_runs_on_each_embedded_modality(tmp_path, config):
    cli = fit(config, tmp_path, "--trainer.max_epochs", "1", "--data.batch_size", "8", base=TINY_RUN)
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    expected = (64, 101) if config in AUDIO_CONFIGS else (8, 32, 32)
    assert cli.model.input_spec.shape == expected and cli.model.hparams.input_spec["shape"] == list(expected)


# -- the token interface ---------------------------------------------------------------------
#: 1 s of 16 kHz audio as 64 mel bins x 101 frames (``in_chans`` follows the 1 channel).
SPECTROGRAM = InputSpec("audio", (64, 101), 1)


def spectrogram_mae(**kwargs) -> MAE:
    return MAE(backbone="vit_tiny_patch16_224", input_spec=SPECTROGRAM, backbone_kwargs={"patch_size": [8, 8], "depth": 1},
               decoder_depth=1, mask_ratio=0.8, **kwargs)  # fmt: skip


def video_mae(**kwargs) -> MAE:
    return MAE(backbone="video_vit_tiny", input_spec=InputSpec.video(8, 32), backbone_kwargs={"depth": 1, "patch_size": 8}, decoder_depth=1, **kwargs)


def test_token_interface_covers_image_spectrogram_and_video_vits():
    spectrogram = patch_tokens(spectrogram_mae().backbone)
    assert isinstance(spectrogram, ImageViTTokens)
    assert spectrogram.grid == (8, 12) and spectrogram.patch_dim == 64 and not spectrogram.has_time
    inputs = torch.randn(2, 1, 64, 101)
    assert spectrogram.covered(inputs).shape == (2, 1, 64, 96)  # 5 frames fill no patch
    assert torch.equal(spectrogram.unpatchify(spectrogram.patchify(inputs)), inputs[..., :96])
    video = patch_tokens(video_mae().backbone)
    assert isinstance(video, VideoViTTokens) and video.grid == (4, 4, 4) and video.patch_dim == 2 * 8 * 8 * 3
    with pytest.raises(TypeError, match="ViT"):
        patch_tokens(torch.nn.Linear(2, 2))


def test_video_patchify_matches_the_tubelet_embedding():
    """Token order and patch layout agree with the 3-D convolution, so hidden tubelets are the
    ones the loss reconstructs."""
    patches = patch_tokens(video_mae().backbone)
    clips = torch.randn(2, 3, 8, 32, 32)
    conv = patches.backbone.patch_embed
    weight = conv.weight.permute(0, 2, 3, 4, 1).reshape(conv.out_channels, -1)  # (D, t * h * w * C)
    expected = patches.patchify(clips) @ weight.T + conv.bias
    assert torch.allclose(conv(clips).flatten(2).transpose(1, 2), expected, atol=1e-5)


def test_mae_masking_defaults_per_modality():
    video = video_mae()
    assert video.mask_ratio == 0.9 and video.tube
    mask = video.random_mask(3).mask.view(3, 4, 16)  # (batch, time slices, spatial positions)
    assert (mask == mask[:, :1]).all() and mask.float().mean() == pytest.approx(14 / 16)
    assert not video_mae(masking="random").tube
    image = MAE(backbone="vit_tiny_patch16_224", input_spec=InputSpec.image(16), backbone_kwargs={"depth": 1}, decoder_depth=1)
    assert image.mask_ratio == 0.75 and not image.tube
    with pytest.raises(ValueError, match="tube"):
        MAE(backbone="vit_tiny_patch16_224", input_spec=InputSpec.image(16), masking="tube")


@pytest.mark.parametrize("build", [spectrogram_mae, video_mae], ids=["audio-mae", "video-mae"])
def test_mae_loss_trains_encoder_and_decoder_and_fixes_position_embeddings(build):
    model = build()
    shape = (4, 1, 64, 101) if model.patches.grid == (8, 12) else (4, 3, 8, 32, 32)
    loss, features = model.training_loss([torch.randn(*shape)])
    loss.backward()
    assert torch.isfinite(loss) and features.shape == (4, model.feature_dim)
    assert model.decoder.pred.weight.grad.abs().sum() > 0
    assert next(model.backbone.blocks.parameters()).grad.abs().sum() > 0
    assert not model.backbone.pos_embed.requires_grad


def test_reconstruction_figures_spectrogram_rows_and_video_frame_strips():
    spectrogram = reconstruction_grid(spectrogram_mae(), torch.randn(2, 1, 64, 101))
    # 2 rows of (original | masked | reconstruction), 64 x 96 panels, 2 px padding
    assert spectrogram.shape == (3, 2 * 66 + 2, 3 * 98 + 2)
    assert 0 <= spectrogram.min() and spectrogram.max() <= 1
    clips = reconstruction_grid(video_mae(), torch.randn(2, 3, 8, 32, 32))
    # per clip: 3 strips of 8 frames (32 px zoomed x2 to 64 px)
    assert clips.shape == (3, 2 * 3 * 66 + 2, 8 * 66 + 2)


def test_msn_masks_video_tubelets_and_spectrogram_patches():
    video = MSN(backbone="video_vit_tiny", input_spec=InputSpec.video(8, 32), backbone_kwargs={"depth": 1, "patch_size": 8}, num_prototypes=8,
                projection_hidden_dim=32, projection_dim=16, mask_ratio=0.25)  # fmt: skip
    features = video.anchor_features([torch.randn(3, 3, 8, 32, 32)])
    assert features.shape == (3, video.feature_dim)
    loss, _ = video.training_loss([torch.randn(3, 3, 8, 32, 32), torch.randn(3, 3, 8, 32, 32)])
    assert torch.isfinite(loss)
    audio = MSN(backbone="vit_tiny_patch16_224", input_spec=SPECTROGRAM, backbone_kwargs={"patch_size": [8, 8], "depth": 1},
                num_prototypes=8, projection_hidden_dim=32, projection_dim=16)  # fmt: skip
    loss, _ = audio.training_loss([torch.randn(3, 1, 64, 101), torch.randn(3, 1, 64, 101)])
    assert torch.isfinite(loss)


# -- weak / strong pairs -----------------------------------------------------------------------
def test_paired_views_take_one_weak_and_one_strong_view():
    weak = VideoViews(num_views=1, crop_scale=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0)
    strong = VideoViews(num_views=1, flip_prob=0.0, erase_prob=1.0)
    pair = PairedViews(weak, strong)
    pair.configure(InputSpec.video(4, 16, (0.5,) * 3, (0.25,) * 3))
    clip = torch.full((4, 3, 16, 16), 200, dtype=torch.uint8)
    views = pair(clip)
    assert [v.shape for v in views] == [(3, 4, 16, 16)] * 2
    assert torch.allclose(views[0], torch.full_like(views[0], (200 / 255 - 0.5) / 0.25))
    erased = views[1] == 0
    assert erased.any() and (erased == erased[:, :1]).all()  # the same rectangle in every frame
    with pytest.raises(ValueError, match="num_views"):
        PairedViews(AudioViews(), AudioViews(num_views=1))


def test_audio_datamodule_configures_both_parts_and_rejects_image_views():
    from ssl_kit.data import SyntheticAudioDataModule
    from ssl_kit.transforms import ImageViews

    pair = PairedViews(AudioViews(num_views=1, noise_prob=0.0), AudioViews(num_views=1))
    data = SyntheticAudioDataModule(n_fft=256, views=pair)
    assert pair.weak.clip_samples == pair.strong.clip_samples == data.clip_samples
    with pytest.raises(TypeError, match="ImageViews"):
        SyntheticAudioDataModule(views=PairedViews(AudioViews(num_views=1), ImageViews(num_views=1)))


@pytest.mark.slow
def test_audio_mae_saves_spectrogram_reconstructions(tmp_path):
    fit("mae_synthetic_audio.yaml", tmp_path, "--trainer.max_epochs", "1", "--data.batch_size", "8", base=TINY_RUN)
    figures = sorted(tmp_path.rglob("reconstructions/epoch0000.png"))
    assert figures
    with Image.open(figures[0]) as image:
        assert image.size == (3 * 98 + 2, 8 * 66 + 2)  # 8 rows of three 64 x 96 spectrogram panels
