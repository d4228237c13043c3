"""``InputSpec``: one typed description of the input, built by each modality's DataModule, linked
into the model, read by the views and the backbone factory, and kept in checkpoints as plain types."""

from __future__ import annotations

import pytest
import torch

from ssl_kit.checkpoints import read_checkpoint, saved_input_spec, upgrade_hparams
from ssl_kit.data import DigitsDataModule, SyntheticAudioDataModule, MovingDigitsDataModule
from ssl_kit.inputs import InputSpec, LogMelSettings
from ssl_kit.methods import SimCLR
from ssl_kit.models.backbones import backbone_spec


def test_each_modality_describes_its_input():
    image = DigitsDataModule(image_size=16, num_workers=0).input_spec
    assert image == InputSpec("image", (16, 16), 3, DigitsDataModule.mean, DigitsDataModule.std)
    audio = SyntheticAudioDataModule(num_workers=0, n_mels=32, clip_seconds=0.5).input_spec
    assert audio.modality == "audio" and audio.channels == 1 and audio.mean is None
    assert audio.shape == (32, 51) and audio.front_end.clip_samples == 4000  # 0.5 s at 8 kHz
    assert audio.front_end.hop_length == 80 and audio.front_end.f_max == 4000.0  # 10 ms, Nyquist
    video = MovingDigitsDataModule(num_workers=0, frames_per_clip=4, frame_size=16).input_spec
    assert video.modality == "video" and video.shape == (4, 16, 16) and video.frames == 4


def test_video_and_audio_refuse_an_image_size():
    with pytest.raises(ValueError, match="frame_size"):
        MovingDigitsDataModule(num_workers=0, image_size=16)
    with pytest.raises(ValueError, match="n_mels"):
        SyntheticAudioDataModule(num_workers=0, image_size=16)


def test_a_shape_must_fit_its_modality_and_front_end():
    with pytest.raises(ValueError, match="3 sizes"):
        InputSpec("video", (16, 16))
    with pytest.raises(ValueError, match="front end"):
        InputSpec("audio", (64, 10), 1, front_end=LogMelSettings(16000, 16000))


def test_the_spec_round_trips_through_plain_types():
    for spec in (InputSpec.image(32, (0.5,) * 3, (0.25,) * 3), InputSpec.video(8, 32), InputSpec.audio(LogMelSettings(8000, 8000, n_mels=32))):
        saved = spec.to_dict()
        assert all(isinstance(v, (str, int, float, list, dict, type(None))) for v in saved.values())
        assert InputSpec.from_dict(saved) == spec == InputSpec.coerce(saved) == InputSpec.coerce(spec)


def test_the_backbone_follows_the_spec():
    assert backbone_spec("vit_tiny_patch16_224", InputSpec.image(32)).kwargs == {"num_classes": 0, "img_size": 32, "patch_size": 4}
    spectrogram = backbone_spec("resnet18", InputSpec("audio", (64, 101), 1))
    assert spectrogram.kwargs["in_chans"] == 1 and not spectrogram.cifar_stem  # 101 frames: not a small image
    video = backbone_spec("video_vit_tiny", InputSpec.video(8, 32))
    assert video.kwargs == {"num_classes": 0, "img_size": 32, "num_frames": 8, "patch_size": 4}
    with pytest.raises(ValueError, match="video backbone"):
        backbone_spec("resnet18", InputSpec.video(8, 32))


def test_a_checkpoint_keeps_the_spec_and_old_ones_are_upgraded(tmp_path):
    model = SimCLR(backbone="resnet18", input_spec=InputSpec.image(8), projection_hidden_dim=8, projection_dim=4)
    path = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    assert saved_input_spec(read_checkpoint(path)["hyper_parameters"]) == InputSpec.image(8)
    # Before the typed spec a checkpoint recorded image_size only.
    assert upgrade_hparams({"image_size": 8, "lr": 0.1}) == {"input_spec": InputSpec.image(8).to_dict(), "lr": 0.1}
    assert saved_input_spec({"image_size": [4, 16, 16]}) == InputSpec.video(4, 16)
    assert saved_input_spec({"image_size": [64, 101], "backbone_kwargs": {"in_chans": 1}}) == InputSpec("audio", (64, 101), 1)
    assert upgrade_hparams(dict(model.hparams)) == dict(model.hparams)
