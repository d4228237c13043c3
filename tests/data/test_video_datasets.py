"""UCF101, HMDB51 and Kinetics on fixture files in their real layouts (avi / mp4 written with
PyAV, the official split and annotation files): fold choice, group-disjoint validation, labels,
clips from the loaders, absent and corrupt videos, and a short CLI pretraining run."""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import TINY_RUN, fit, write_mp4
from ssl_kit.data import HMDB51DataModule, KineticsDataModule, UCF101DataModule
from ssl_kit.data.samples import UnreadableFileError

FAST = dict(frames_per_clip=4, frame_stride=2, frame_size=16, batch_size=2, num_workers=0)
UCF_CLASSES = ("YoYo", "ApplyEyeMakeup", "Basketball")  # classInd order, not alphabetical


def write_ucf101(root, folds=(1, 2)):
    """3 classes x 4 groups x 2 clips under root/UCF-101; fold f tests group g0f (CRLF lists, as shipped)."""
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{i} {name}\r\n" for i, name in enumerate(UCF_CLASSES, 1)))
    videos = [f"{name}/v_{name}_g{group:02d}_c{clip:02d}.avi" for name in UCF_CLASSES for group in range(1, 5) for clip in (1, 2)]
    for i, video in enumerate(videos):
        (root / "UCF-101" / video).parent.mkdir(parents=True, exist_ok=True)
        write_mp4(root / "UCF-101" / video, frames=8, shade=30 * (i % 8))
    for fold in folds:
        test = [video for video in videos if f"_g{fold:02d}_" in video]
        train = [video for video in videos if video not in test]
        label = {name: i for i, name in enumerate(UCF_CLASSES, 1)}
        (lists / f"trainlist0{fold}.txt").write_text("".join(f"{v} {label[v.split('/')[0]]}\r\n" for v in train))
        (lists / f"testlist0{fold}.txt").write_text("".join(f"{v}\r\n" for v in test))
    return videos


def group_of(path: str) -> str:
    return path.rsplit("_c", 1)[0]  # .../v_<Class>_gXX


def test_ucf101_folds_labels_group_disjoint_val_and_clips(tmp_path):
    write_ucf101(tmp_path)
    data = UCF101DataModule(str(tmp_path), val_fraction=0.34, **FAST)
    assert data.num_classes == 3 and data.classes == list(UCF_CLASSES)
    data.setup("fit")
    splits = data.splits
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 6)
    assert all("_g01_" in path for path, _ in splits.test.samples)
    assert all(UCF_CLASSES[label] in path.split("/")[-2] for path, label in splits.train.samples + splits.test.samples)
    train_groups = {group_of(path) for path, _ in splits.train.samples}
    val_groups = {group_of(path) for path, _ in splits.val.samples}
    assert not train_groups & val_groups and len(val_groups) == 3  # one whole group of each class
    assert sorted(splits.val.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    views, labels = next(iter(data.train_dataloader()))
    assert [v.shape for v in views] == [(2, 3, 4, 16, 16)] * 2 and labels.shape == (2,)
    clips, _ = next(iter(data.test_dataloader()))
    assert clips.shape == (2, 3, 4, 16, 16) and clips.dtype == torch.float32
    second = UCF101DataModule(str(tmp_path), fold=2, val_fraction=0.34, **FAST)
    second.setup("fit")
    assert all("_g02_" in path for path, _ in second.splits.test.samples)
    assert not any("_g02_" in path for path, _ in second.splits.train.samples + second.splits.val.samples)


def test_ucf101_missing_files_and_corrupt_video(tmp_path, caplog):
    videos = write_ucf101(tmp_path, folds=(1,))
    with pytest.raises(FileNotFoundError, match=r"trainlist03.txt.*crcv.ucf.edu"):
        UCF101DataModule(str(tmp_path), fold=3, **FAST).setup("fit")
    with pytest.raises(ValueError, match="fold must be 1-3"):
        UCF101DataModule(str(tmp_path), fold=4)
    with pytest.raises(FileNotFoundError, match=r"classInd.txt"):
        UCF101DataModule(str(tmp_path / "elsewhere"))
    broken = tmp_path / "UCF-101" / videos[0]  # a test video of fold 1
    broken.write_bytes(b"RIFF\x00\x00\x00\x00AVI not really a video")
    options = dict(FAST, val_fraction=0.34)
    data = UCF101DataModule(str(tmp_path), **options)
    with pytest.raises(UnreadableFileError, match=f"{broken.name}.*skip_bad_files"):
        for _ in data.test_dataloader():
            pass
    data = UCF101DataModule(str(tmp_path), skip_bad_files=True, **options)
    with caplog.at_level(logging.WARNING):
        seen = sum(len(labels) for _, labels in data.test_dataloader())
    assert seen == 6 and broken.name in caplog.text  # the broken clip replaced by a readable one's copy
    (tmp_path / "UCF-101" / videos[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=videos[-1].split("/")[1]):
        UCF101DataModule(str(tmp_path), **options).setup("fit")


def test_hmdb51_split_ids_folds_and_missing_video(tmp_path):
    classes = ("brush_hair", "climb_stairs")  # underscores, as in the real class names
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    ids = {1: "1 1 1 1 2 2 0", 2: "2 2 1 1 1 1 0"}  # per video; 0 = unused in that fold
    for label, name in enumerate(classes):
        (tmp_path / name).mkdir()
        videos = [f"{name}_clip{i}_f_cm_np1_fr_med_{i}.avi" for i in range(7)]
        for i, video in enumerate(videos):
            write_mp4(tmp_path / name / video, frames=8, shade=90 * label + 5 * i)
        for fold, line in ids.items():
            (splits / f"{name}_test_split{fold}.txt").write_text("".join(f"{v} {i} \n" for v, i in zip(videos, line.split())))
    data = HMDB51DataModule(str(tmp_path), val_fraction=0.25, **FAST)
    assert data.num_classes == 2 and data.classes == list(classes)
    data.setup("fit")
    assert (len(data.splits.train), len(data.splits.val), len(data.splits.test)) == (6, 2, 4)
    assert {path.rsplit("_", 1)[-1] for path, _ in data.splits.test.samples} == {"4.avi", "5.avi"}
    assert not any(path.endswith("_6.avi") for path, _ in data.splits.train.samples + data.splits.val.samples)
    assert all(classes[label] in path for path, label in data.splits.test.samples)
    clips, labels = next(iter(data.test_dataloader()))
    assert clips.shape == (2, 3, 4, 16, 16)
    second = HMDB51DataModule(str(tmp_path), fold=2, val_fraction=0.25, **FAST)
    second.setup("fit")
    assert {path.rsplit("_", 1)[-1] for path, _ in second.splits.test.samples} == {"0.avi", "1.avi"}
    with pytest.raises(FileNotFoundError, match=r"testTrainMulti_7030_splits.*serre-lab"):
        HMDB51DataModule(str(tmp_path / "elsewhere"))
    (tmp_path / "climb_stairs" / "climb_stairs_clip5_f_cm_np1_fr_med_5.avi").unlink()
    with pytest.raises(FileNotFoundError, match="climb_stairs_clip5_f_cm_np1_fr_med_5.avi"):
        HMDB51DataModule(str(tmp_path), **FAST).setup("fit")
    (splits / "brush_hair_test_split3.txt").write_text("brush_hair_clip0_f_cm_np1_fr_med_0.avi 7\n")
    with pytest.raises(ValueError, match=r"brush_hair_test_split3.txt.*clip0.* 7"):
        HMDB51DataModule(str(tmp_path), fold=3, **FAST).setup("fit")


def kinetics_name(youtube_id: str, start: int) -> str:
    return f"{youtube_id}_{start:06d}_{start + 10:06d}.mp4"


def test_kinetics_csvs_skip_absent_clips(tmp_path, caplog):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    train_rows, val_rows = [], []
    for label, shade in (("air drumming", 0), ("abseiling", 90)):
        for i in range(4):
            youtube_id = f"{label[:3]}{i}xYz-_{i}"
            train_rows.append(f"{label},{youtube_id},{10 * i},{10 * i + 10},train")
            if i < 3 or label == "abseiling":  # one dead link: listed, never downloaded
                (tmp_path / "train" / label).mkdir(parents=True, exist_ok=True)
                write_mp4(tmp_path / "train" / label / kinetics_name(youtube_id, 10 * i), frames=8, shade=shade)
        val_rows.append(f'"{label}",val{shade},5,15,validate')
        (tmp_path / "val").mkdir(exist_ok=True)
        write_mp4(tmp_path / "val" / kinetics_name(f"val{shade}", 5), frames=8, shade=shade)  # flat, as some downloaders write
    (annotations / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n" + "\n".join(train_rows))
    (annotations / "validate.csv").write_text("label,youtube_id,time_start,time_end,split\n" + "\n".join(val_rows))
    (annotations / "test.csv").write_text("youtube_id,time_start,time_end,split\nabc,0,10,test\n")  # labels withheld
    data = KineticsDataModule(str(tmp_path), **FAST)
    assert data.classes == ["abseiling", "air drumming"] and data.num_classes == 2
    with caplog.at_level(logging.WARNING):
        data.setup("fit")
    assert len(data.splits.train) == 7 and len(data.splits.val) == 2 and data.splits.test is None
    assert "1 of the 8 clips" in caplog.text and "test.csv has no labels" in caplog.text
    assert sorted(data.splits.val.labels.tolist()) == [0, 1]
    assert all(("abseiling" in path) == (label == 0) for path, label in data.splits.train.samples)
    views, _ = next(iter(data.train_dataloader()))
    assert views[0].shape == (2, 3, 4, 16, 16)
    (annotations / "test.csv").write_text("label,youtube_id,time_start,time_end,split\nabseiling,gone,0,10,test\n")
    with pytest.raises(FileNotFoundError, match=r"none of the 1 clips of .*test.csv is under .*test/"):
        KineticsDataModule(str(tmp_path), **FAST).setup("fit")


def test_kinetics_class_folders_without_annotations(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"annotations/train.csv.*train/<class>"):
        KineticsDataModule(str(tmp_path))
    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(3):
            write_mp4(tmp_path / "train" / label / f"{i}.mp4", frames=8)
    data = KineticsDataModule(str(tmp_path), val_fraction=0.34, **FAST)
    data.setup("fit")
    assert data.classes == ["a", "b"] and (len(data.splits.train), len(data.splits.val)) == (4, 2)


def test_ucf101_config_pretrains_on_the_fixture(tmp_path):
    write_ucf101(tmp_path / "ucf101", folds=(1,))
    cli = fit(
        "simclr_ucf101.yaml", tmp_path / "run", "--trainer.max_epochs", "1", "--data.root", str(tmp_path / "ucf101"),
        "--data.batch_size", "2", "--data.frame_size", "32", "--data.frames_per_clip", "4", "--data.val_fraction", "0.34",
        "--model.backbone_kwargs", '{"depth": 1, "patch_size": 8}', base=TINY_RUN,
    )  # fmt: skip
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.model.hparams.num_classes == 3 and cli.model.input_spec.shape == (4, 32, 32)
