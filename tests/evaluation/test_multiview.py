"""Multi-view video testing (VideoMAE's clips x crops): the clips and crops cut from a video, the
test loader of a video DataModule, extraction that runs each view alone, and the linear probe,
kNN and fine-tuning scoring a video by the mean of its views' scores, each checked against the
views scored one at a time."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import write_video_folder
from ssl_kit import evaluation as P
from ssl_kit.data import MovingDigitsDataModule, VideoFolderDataModule
from ssl_kit.data.video import clip_indices
from ssl_kit.evaluation import FeatureSet
from ssl_kit.evaluation.features import FeatureExtractor
from ssl_kit.evaluation.fine_tune import FineTuner
from ssl_kit.transforms.video import VideoEval, VideoTestViews

pytestmark = pytest.mark.usefixtures("one_thread")

VIEWS, CLASSES, DIM = 3, 4, 8
CENTERS = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))


def noisy_views(n: int, seed: int, views: int) -> FeatureSet:
    """``views`` noisy views per sample of class blobs: a view alone is often wrong, their mean less often."""
    labels = torch.arange(n) % CLASSES
    noise = 2.5 * torch.randn(n, views, DIM, generator=torch.Generator().manual_seed(seed))
    return FeatureSet((CENTERS[labels].unsqueeze(1) + noise).flatten(0, 1), labels, views)


TRAIN, VAL, TEST = noisy_views(300, 1, 1), noisy_views(100, 2, 1), noisy_views(300, 3, VIEWS)


def view(features: FeatureSet, index: int) -> FeatureSet:
    """The single-view feature set of one view of every sample."""
    return FeatureSet(features.features[index :: features.views], features.labels)


def test_n_clips_are_spread_over_the_video_and_one_is_the_central_clip():
    clips = clip_indices(100, 4, 3, 5)  # span 10, room 90: starts 0, 22.5, 45, 67.5, 90 rounded down
    assert clips[:, 0].tolist() == [0, 22, 45, 67, 90] and (np.diff(clips, axis=1) == 3).all()
    assert clip_indices(100, 4, 3, 1).tolist() == [clip_indices(100, 4, 3, "center").tolist()]
    assert clip_indices(5, 4, 2, 3).tolist() == [[0, 2, 4, 4]] * 3  # too short: every clip is the whole video


def test_crops_slide_along_the_long_side_and_one_crop_is_the_centre_crop():
    mean, std = (0.5,) * 3, (0.25,) * 3
    clips = torch.randint(0, 255, (2, 3, 3, 16, 24), dtype=torch.uint8)  # 2 clips of 3 frames, 16 x 24
    views = VideoTestViews(16, mean, std, crops=3)(clips)
    single = VideoEval(16, mean, std)  # short side already 16: no resize, so a 16 x 16 crop is its own centre crop
    assert views.shape == (6, 3, 3, 16, 16)
    for index, (clip, left) in enumerate((clip, left) for clip in range(2) for left in (0, 4, 8)):
        assert torch.equal(views[index], single(clips[clip][..., left : left + 16]))
    tall = clips.transpose(-1, -2)  # 24 x 16: the crops slide down instead
    assert torch.equal(VideoTestViews(16, mean, std, crops=3)(tall[0])[2], single(tall[0][..., 8:24, :]))
    assert torch.equal(VideoTestViews(16, mean, std, crops=1)(clips[1])[0], single(clips[1]))


def test_video_folder_test_split_is_clips_times_crops_and_the_others_one_clip(tmp_path):
    write_video_folder(tmp_path, {"train": 3, "test": 1})  # 10 frames
    settings = dict(frames_per_clip=4, frame_stride=2, frame_size=16, batch_size=2, num_workers=0, val_fraction=0.34)
    data = VideoFolderDataModule(str(tmp_path), test_clips=2, test_crops=3, **settings)
    assert data.test_views == 6
    clips, _ = next(iter(data.test_dataloader()))
    assert clips.shape == (2, 6, 3, 4, 16, 16)
    val_clips, _ = next(iter(data.labeled_dataloader("val")))
    assert val_clips.shape == (2, 3, 4, 16, 16)
    first_clip = VideoFolderDataModule(str(tmp_path), **settings).labeled_dataset("test")[0][0]
    later_clip = clips[0, 3:]  # the second clip's crops: frames 3, 5, 7, 9 of 10 (the central clip: 1, 3, 5, 7)
    assert not torch.equal(later_clip[0], first_clip) and torch.equal(later_clip[0], later_clip[1])  # square frames: equal crops
    with pytest.raises(ValueError, match="test_clips"):
        MovingDigitsDataModule(clips_per_class=2, test_clips=5)
    with pytest.raises(ValueError, match="at least 1"):
        VideoFolderDataModule(str(tmp_path), test_crops=0)


class Loaders:
    """The one DataModule method feature extraction uses."""

    def loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=4, shuffle=shuffle)


def test_extraction_runs_every_view_alone_and_keeps_them_in_sample_order():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).eval()  # BatchNorm: a view must not see the others
    inputs, labels = torch.randn(7, VIEWS, 6), torch.arange(7) % 2
    trainer_kwargs = {"accelerator": "cpu", "devices": 1}
    features = P.extract_datasets(backbone, Loaders(), {"test": TensorDataset(inputs, labels)}, trainer_kwargs, views={"test": VIEWS})["test"]
    assert features.views == VIEWS and torch.equal(features.labels, labels)
    with torch.no_grad():
        for index in range(VIEWS):
            assert torch.allclose(view(features, index).features, backbone(inputs[:, index]), atol=1e-6)
    with pytest.raises(ValueError, match="3 views per sample"):
        FeatureExtractor(backbone, views=VIEWS).test_step((torch.arange(2), (torch.randn(2, 2, 6), labels[:2])), 0)


def test_linear_probe_and_knn_score_a_video_by_the_mean_of_its_views_scores():
    settings = dict(epochs=20, lrs=(0.1,), weight_decays=(0.0,))
    (head,) = P.train_linear_heads(TRAIN, CLASSES, [(0.1, 0.0)], epochs=20)
    with torch.no_grad():
        view_logits = [head(view(TEST, index).features) for index in range(VIEWS)]
    expected = P.top1(torch.stack(view_logits).mean(0), TEST.labels)
    assert P.linear_probe(TRAIN, VAL, TEST, CLASSES, **settings).test_top1 == pytest.approx(expected)
    single_view = [P.top1(logits, TEST.labels) for logits in view_logits]
    assert expected > max(single_view) + 0.05  # the views' mean is what is scored, not one view

    votes = [P.knn_predict(view(TEST, index).features, TRAIN.features, TRAIN.labels, CLASSES, k=10, temperature=0.1) for index in range(VIEWS)]
    expected = P.top1(torch.stack(votes).mean(0), TEST.labels)
    assert P.knn(TRAIN, TEST, CLASSES, k=10, temperature=0.1) == pytest.approx(expected)
    assert expected > max(P.top1(vote, TEST.labels) for vote in votes)
    with pytest.raises(ValueError, match="kNN bank features have 3 views"):
        P.knn(TEST, TEST, CLASSES)


def test_a_multi_view_subset_keeps_every_view_of_its_samples():
    subset = TEST.subset([4, 1])
    assert subset.views == VIEWS and subset.labels.tolist() == TEST.labels[[4, 1]].tolist()
    assert torch.equal(subset.features, TEST.features[[12, 13, 14, 3, 4, 5]])


class Flat(nn.Module):
    """A backbone for fine-tuning tests: a linear map of flat inputs, with timm's ``num_features``."""

    num_features = 5

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 5)

    def forward(self, inputs):
        return self.linear(inputs)


def test_fine_tuning_scores_a_video_by_the_mean_of_its_views_logits():
    torch.manual_seed(0)
    model = FineTuner(Flat(), num_classes=3, lr=0.1, weight_decay=0.0, test_views=VIEWS).eval()
    inputs = torch.randn(40, VIEWS, 6)
    with torch.no_grad():
        view_logits = torch.stack([model(inputs[:, index]) for index in range(VIEWS)])
    labels = view_logits.mean(0).argmax(-1)  # right exactly when the views' mean logits are scored
    assert max(P.top1(logits, labels) for logits in view_logits) < 0.9
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.test(model, DataLoader(TensorDataset(inputs, labels), batch_size=16), verbose=False)
    assert metrics["test/acc"] == 1.0


@pytest.mark.slow
def test_a_suite_cell_on_clips_scores_multi_view_rows_and_the_weighted_layer_probe(tmp_path):
    from helpers import REPO, TINY_RUN
    from ssl_kit.bench.runner import Entry, run_suite
    from ssl_kit.bench.store import ResultStore

    args = [*TINY_RUN, "--trainer.max_epochs", "0", "--data.clips_per_class", "10", "--data.batch_size", "16", "--data.test_crops", "2",
            "--model.backbone_kwargs", '{"depth": 2, "patch_size": 8}']  # fmt: skip
    entry = Entry(method="Random init", dataset="MovingDigits", config=str(REPO / "configs" / "mae_moving_digits.yaml"), args=args)
    self_training = Entry(
        method="MeanTeacher", dataset="MovingDigits", config=str(REPO / "configs" / "mean_teacher_moving_digits.yaml"), protocols=["few_label"],
        args=[*args, "--data.labels_per_class", "2", "--data.batch_size", "4", "--trainer.max_epochs", "-1", "--trainer.max_steps", "1"],
    )  # its teacher's test accuracy is its few_label row
    protocols = {
        "linear": {"epochs": 5}, "knn": {"k": 5}, "layer_weighted_linear": {"epochs": 5},
        "few_label": {"labels_per_class": 2, "selection": "few_val", "epochs": 5}, "fine_tune": {"epochs": 1, "lr": 1e-3, "weight_decay": 0.0},
    }  # fmt: skip
    store = tmp_path / "store.sqlite"
    run_suite("clips", [entry, self_training], seeds=[0], protocols=protocols, store=str(store), workdir=str(tmp_path / "runs"))
    rows = {(row["method"], row["protocol"]): row for row in ResultStore(str(store)).rows("clips")}
    assert sorted(rows) == sorted([("MeanTeacher", "few_label"), *(("Random init", protocol) for protocol in protocols)])
    rows = {protocol: row for (method, protocol), row in rows.items() if method == "Random init"}
    assert all(row["config"]["fit"]["data"]["init_args"]["test_crops"] == 2 for row in rows.values())  # the row says how it was tested
    assert len(rows["layer_weighted_linear"]["config"]["protocol"]["layer_weights"]) == 2  # one weight per block
    assert rows["few_label"]["config"]["protocol"]["selection"] == "few_val"


def test_a_suite_cell_on_long_moving_digits_scores_three_clips_per_test_video(tmp_path):
    """Two SimCLR steps on random 8-frame clips of 20-frame videos, then linear and kNN rows scored
    on 3 clips per test video (extraction refuses a test batch without them)."""
    from helpers import REPO, TINY_RUN
    from ssl_kit.bench.runner import Entry, run_suite
    from ssl_kit.bench.store import ResultStore

    args = [*TINY_RUN, "--trainer.max_epochs", "1", "--data.clips_per_class", "10", "--data.batch_size", "16", "--data.video_frames", "20",
            "--data.test_clips", "3", "--model.backbone_kwargs", '{"depth": 1, "patch_size": 8}']  # fmt: skip
    entry = Entry(method="SimCLR", dataset="MovingDigits (3 clips)", config=str(REPO / "configs" / "simclr_moving_digits.yaml"), args=args)
    store = tmp_path / "store.sqlite"
    run_suite("clips", [entry], seeds=[0], protocols={"linear": {"epochs": 5}, "knn": {"k": 5}}, store=str(store), workdir=str(tmp_path / "runs"))
    rows = {row["protocol"]: row for row in ResultStore(str(store)).rows("clips")}
    assert sorted(rows) == ["knn", "linear"]
    for row in rows.values():
        assert row["config"]["fit"]["data"]["init_args"]["test_clips"] == 3 and row["config"]["fit"]["data"]["init_args"]["video_frames"] == 20
        assert 0.0 <= row["value"] <= 1.0
