"""UCF101 and HMDB51 from their official split files; nothing is downloaded (the archives are .rar files)."""

from __future__ import annotations

import re
from pathlib import Path

from ssl_kit.data.base import Splits
from ssl_kit.data.video.base import VideoDataModule


class OfficialSplitsDataModule(VideoDataModule):
    """The shared code of UCF101 and HMDB51: classes and the ``fold`` (1-3) train / test lists
    from the official split files in ``root/<split_folder>``, videos ``<class>/<file>`` under
    ``videos`` (relative to root, or absolute; None: the first of ``video_folders`` that exists,
    else root). Validation is a seeded stratified ``val_fraction`` of the official train list, in
    whole ``group``s; test is the official test list. Nothing is downloaded: the archives are .rar
    files (unrar, 7z or bsdtar extract them)."""

    dataset: str
    homepage: str
    split_folder: str
    video_folders: tuple[str, ...] = ()

    def __init__(self, root: str, *args, fold: int = 1, videos: str | None = None, **kwargs) -> None:
        super().__init__(root, *args, **kwargs)
        if fold not in (1, 2, 3):
            raise ValueError(f"{self.dataset} fold must be 1-3, got {fold}")
        self.fold = fold
        base = Path(root).expanduser()
        default = next((base / name for name in self.video_folders if (base / name).is_dir()), base)
        self.video_dir = default if videos is None else base / videos
        self.classes = self.read_classes()
        self.num_classes = len(self.classes)

    def split_file(self, name: str) -> Path:
        """A file (or, for ``""``, the folder) of the official splits; absent, an error saying where to get it."""
        path = Path(self.root).expanduser() / self.split_folder / name
        if not path.exists():
            raise FileNotFoundError(
                f"{self.dataset} split file not found: {path}. Download the videos and the official train/test splits from "
                f"{self.homepage} and extract both into {self.root} (the archives are .rar: unrar, 7z or bsdtar open them)."
            )
        return path

    def rows(self, name: str) -> list[list[str]]:
        """The whitespace-separated fields of the non-empty lines of a split file."""
        return [line.split() for line in self.split_file(name).read_text().splitlines() if line.strip()]

    def read_classes(self) -> list[str]:
        """Class names in label order."""
        raise NotImplementedError

    def official_lists(self) -> tuple[list[str], list[str]]:
        """``<class>/<file>`` of the train and test videos of ``fold``."""
        raise NotImplementedError

    def group(self, video: str) -> str:
        """Videos of one group are held out together (default: each video is its own group)."""
        return video

    def locate(self, videos: list[str]) -> list[tuple[str, int]]:
        """Samples of listed ``<class>/<file>`` videos; absent ones are an error naming them."""
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [video for video in videos if video.split("/")[0] not in index]
        if unknown:
            raise ValueError(f"{self.dataset} fold {self.fold} lists {unknown[0]}, whose class is not one of the {len(index)} classes")
        missing = [str(self.video_dir / video) for video in videos if not (self.video_dir / video).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} video(s) of the {self.dataset} fold-{self.fold} lists not found, first {missing[0]}: expected "
                f"{self.video_dir}/<class>/<video> (videos from {self.homepage}; --data.videos names another folder)"
            )
        return [(str(self.video_dir / video), index[video.split("/")[0]]) for video in videos]

    def load_splits(self) -> Splits:
        train, test = self.official_lists()
        return self.sample_splits(self.locate(train), None, self.locate(test), groups=[self.group(video) for video in train])


UCF101_GROUP = re.compile(r"_(g\d+)_c\d+\.\w+$")


class UCF101DataModule(OfficialSplitsDataModule):
    """UCF101: videos ``root/UCF-101/<Class>/v_<Class>_gXX_cYY.avi`` (as UCF101.rar extracts; or
    ``root/<Class>/...``, or ``videos``) and ``root/ucfTrainTestlist/`` (classInd.txt,
    trainlist0{fold}.txt, testlist0{fold}.txt). 101 classes. The clips of one group gXX are cut
    from one long video, so validation holds out whole groups of each class: otherwise it would
    score near-duplicates of training clips."""

    dataset = "UCF101"
    homepage = "https://www.crcv.ucf.edu/data/UCF101.php"
    split_folder = "ucfTrainTestlist"
    video_folders = ("UCF-101",)

    def read_classes(self) -> list[str]:
        return [name for _, name in sorted((int(number), name) for number, name in self.rows("classInd.txt"))]

    def official_lists(self) -> tuple[list[str], list[str]]:
        train, test = ([row[0] for row in self.rows(f"{part}list0{self.fold}.txt")] for part in ("train", "test"))
        return train, test

    def group(self, video: str) -> str:
        match = UCF101_GROUP.search(video)
        return video if match is None else f"{video.split('/')[0]}/{match[1]}"


class HMDB51DataModule(OfficialSplitsDataModule):
    """HMDB51: videos ``root/<class>/<name>.avi`` (or under ``videos``) and
    ``root/testTrainMulti_7030_splits/<class>_test_split{fold}.txt`` with lines ``<name> <id>``:
    1 train, 2 test, 0 unused in that fold. 51 classes (those with a split file)."""

    dataset = "HMDB51"
    homepage = "https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/"
    split_folder = "testTrainMulti_7030_splits"

    def _suffix(self) -> str:
        return f"_test_split{self.fold}.txt"

    def read_classes(self) -> list[str]:
        folder = self.split_file("")
        classes = sorted(path.name[: -len(self._suffix())] for path in folder.glob(f"*{self._suffix()}"))
        if not classes:
            raise FileNotFoundError(f"no HMDB51 split files <class>{self._suffix()} in {folder} (from {self.homepage})")
        return classes

    def official_lists(self) -> tuple[list[str], list[str]]:
        parts: dict[str, list[str]] = {"1": [], "2": [], "0": []}  # train, test, unused
        for name in self.classes:
            split_file = f"{name}{self._suffix()}"
            for fields in self.rows(split_file):
                if len(fields) != 2 or fields[1] not in parts:
                    raise ValueError(f"{self.split_file(split_file)}: expected '<video> <0|1|2>' lines, got {' '.join(fields)!r}")
                parts[fields[1]].append(f"{name}/{fields[0]}")
        return parts["1"], parts["2"]
