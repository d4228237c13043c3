"""AudioFolder's multi-label layout (a CSV of file -> labels: multi-hot targets, errors naming the
CSV and its line) and its fold-numbered files (``--data.fold``: each fold the test split once,
never trained or pretrained on), FSDD's speakers as folds (``--data.test_speaker``), and a fit
through the CLI on multi-label audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from helpers import TINY_RUN, files_of, fit, tone, write_fold_audio_folder, write_tagged_clips
from ssl_kit.data import AudioFolderDataModule, FSDDDataModule
from ssl_kit.data.datasets import labels_of
from ssl_kit.data.splits import few_label_split, stratified_split

#: The multi-hot targets of ``write_tagged_clips``'s tags over the sorted classes (bird, dog, rain).
MULTI_HOT = {"1-a.wav": [0, 1, 0], "1-b.wav": [0, 1, 1], "2-c.wav": [0, 0, 1], "2-d.wav": [1, 1, 0], "3-e.wav": [1, 0, 0], "3-f.wav": [1, 0, 1]}
AUDIO = dict(num_workers=0, batch_size=2, sample_rate=8000, clip_seconds=0.1, n_mels=16, n_fft=256)


def test_labels_csv_gives_multi_hot_targets_in_every_split(tmp_path):
    data = AudioFolderDataModule(str(tmp_path), labels_csv=str(write_tagged_clips(tmp_path)), fold=2, val_fraction=0.25, **AUDIO)
    assert data.classes == ["bird", "dog", "rain"] and data.num_classes == 3
    data.setup("fit")
    for split in ("pretrain", "train", "val", "test"):
        dataset = getattr(data.splits, split)
        assert [MULTI_HOT[Path(file).name] for file in files_of(dataset)] == labels_of(dataset).tolist(), split
    assert sorted(Path(file).name for file in files_of(data.splits.test)) == ["2-c.wav", "2-d.wav"]
    assert len(data.splits.train) == 3 and len(data.splits.val) == 1  # a seeded quarter of the other folds
    spectrograms, labels = next(iter(data.labeled_dataloader("test")))
    assert spectrograms.shape == (2, 1, 16, 11) and labels.tolist() == [[0, 0, 1], [1, 1, 0]]
    views, labels = next(iter(data.train_dataloader()))
    assert labels.shape == (2, 3) and len(views) == 2


@pytest.mark.parametrize(
    "row, error, message",
    [
        ("clips/9-gone.wav,dog", FileNotFoundError, r"labels\.csv, line 8: 'clips/9-gone\.wav' is not a file under "),
        ("clips/3-g.wav, ; ", ValueError, r"labels\.csv, line 8 \(clips/3-g\.wav\): no labels \(separate a file's labels with ';'\)"),
        ("clips/1-a.wav,rain", ValueError, r"labels\.csv, line 8: .*1-a\.wav is listed twice \(first on line 2\)"),
    ],
)
def test_labels_csv_errors_name_the_csv_and_its_line(tmp_path, row, error, message):
    path = write_tagged_clips(tmp_path)
    soundfile.write(tmp_path / "clips" / "3-g.wav", tone(900.0, 8000, seconds=0.1), 8000)
    path.write_text(path.read_text() + row + "\n")
    with pytest.raises(error, match=message):
        AudioFolderDataModule(str(tmp_path), labels_csv=str(path), **AUDIO)


def test_labels_csv_without_its_columns_is_refused(tmp_path):
    path = write_tagged_clips(tmp_path)
    path.write_text(path.read_text().replace("file,labels", "file,tags", 1))
    with pytest.raises(ValueError, match=r"labels\.csv lacks the column\(s\) labels: its header must be file,labels"):
        AudioFolderDataModule(str(tmp_path), labels_csv=str(path), **AUDIO)


def test_multi_hot_labels_hold_out_a_seeded_share_of_all_samples_and_have_no_few_label_split():
    labels = np.eye(3, dtype=np.int64)[np.arange(20) % 3]
    labels[::4, 0] = 1  # a sample is in up to two classes: no class strata
    kept, held = stratified_split(labels, 0.25, seed=0)
    assert len(held) == 5 and sorted([*kept, *held]) == list(range(20))
    assert held.tolist() == stratified_split(labels, 0.25, seed=0)[1].tolist() != stratified_split(labels, 0.25, seed=1)[1].tolist()
    with pytest.raises(ValueError, match="multi-hot labels"):
        few_label_split(labels, labels_per_class=2)


def test_each_fold_is_the_test_split_once_and_never_trained_on(tmp_path):
    paths = write_fold_audio_folder(tmp_path)
    tested = []
    for fold in (1, 2, 3):
        data = AudioFolderDataModule(str(tmp_path), fold=fold, val_fraction=0.25, **AUDIO)
        data.setup("fit")
        test = files_of(data.splits.test)
        assert len(test) == 4 and all(Path(file).name.startswith(f"{fold}-") for file in test)
        assert np.bincount(labels_of(data.splits.test)).tolist() == [2, 2]  # the class folders still label them
        seen = {file for split in ("pretrain", "train", "val") for file in files_of(getattr(data.splits, split))}
        assert seen == set(paths) - set(test)  # every other file trains, none of the test fold
        tested += test
    assert sorted(tested) == sorted(paths)  # every file is tested exactly once


def test_fsdd_speakers_are_folds_each_tested_once_and_never_trained_on(tmp_path):
    """The benchmark's speaker folds: ``--data.split speaker --data.test_speaker NAME`` for each
    speaker (``fold_arg: --data.test_speaker``) tests every recording once, in an unseen voice."""
    (tmp_path / "recordings").mkdir()
    speakers = ("george", "jackson", "theo")
    for speaker in speakers:
        for digit in range(10):
            for take in range(2):
                soundfile.write(tmp_path / "recordings" / f"{digit}_{speaker}_{take}.wav", tone(150.0 + 40 * digit, 8000, seconds=0.05), 8000)
    tested = []
    for speaker in speakers:
        data = FSDDDataModule(str(tmp_path), split="speaker", test_speaker=speaker, val_fraction=0.25, download=False, **AUDIO)
        data.setup("fit")
        test = files_of(data.splits.test)
        assert len(test) == 20 and all(f"_{speaker}_" in Path(file).name for file in test)
        seen = {file for split in ("pretrain", "train", "val") for file in files_of(getattr(data.splits, split))}
        assert len(seen) == 40 and not seen & set(test)
        tested += test
    assert sorted(tested) == sorted(str(path) for path in (tmp_path / "recordings").glob("*.wav"))


def test_fold_needs_fold_numbered_files_and_no_test_split(tmp_path):
    write_fold_audio_folder(tmp_path)
    soundfile.write(tmp_path / "train" / "low" / "extra.wav", tone(300.0, 8000, seconds=0.1), 8000)
    with pytest.raises(ValueError, match=r"extra\.wav has no fold number: with --data.fold, name every file \{fold\}-<name>"):
        AudioFolderDataModule(str(tmp_path), fold=1, **AUDIO).setup("fit")
    (tmp_path / "train" / "low" / "extra.wav").unlink()
    with pytest.raises(ValueError, match="no file of fold 4"):
        AudioFolderDataModule(str(tmp_path), fold=4, **AUDIO).setup("fit")
    with pytest.raises(ValueError, match="--data.test_fraction must be unset"):
        AudioFolderDataModule(str(tmp_path), fold=1, test_fraction=0.2, **AUDIO).setup("fit")


@pytest.mark.slow
def test_pretraining_runs_on_multi_label_audio_through_the_cli(tmp_path):
    """Multi-hot targets reach the method: the online monitors (single-label) stand aside, the
    training and validation loops run."""
    csv = write_tagged_clips(tmp_path / "audio")
    cli = fit("simclr_audiofolder.yaml", tmp_path / "run", "--trainer.max_epochs", "1", "--data.root", str(tmp_path / "audio"),
              "--data.labels_csv", str(csv), "--data.fold", "2", "--data.val_fraction", "0.25", "--data.batch_size", "2",
              "--data.sample_rate", "8000", "--data.clip_seconds", "0.1", "--data.n_mels", "16", "--data.n_fft", "256", base=TINY_RUN)  # fmt: skip
    assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.model.hparams.num_classes == 3 and "val/knn_acc" not in cli.trainer.callback_metrics
