"""Where labeled images come from: ImageFolder, train/val/test layout, or a CSV manifest.

Discovery only lists files and labels; decoding happens once, in `training.data.decode`.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.errors import TrainingError

# .heic/.heif/.avif: phone photos; exporters.preprocess decodes them (pillow-heif, Pillow's AVIF plugin).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
SPLITS = ("train", "val", "test")


@dataclass
class LabeledFiles:
    paths: list[Path]
    labels: np.ndarray  # int64 indices into the class list
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: np.ndarray) -> "LabeledFiles":
        return LabeledFiles([self.paths[i] for i in idx], self.labels[idx], self.classes)


@dataclass
class DataSource:
    """Named splits found on disk (missing ones are None); all share the train class list."""

    train: LabeledFiles
    val: LabeledFiles | None = None
    test: LabeledFiles | None = None
    origin: dict = field(default_factory=dict)


def _folder_entries(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise TrainingError(f"{root} is not a directory; pass an ImageFolder (one sub-folder per class)")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise TrainingError(f"{root} has no class sub-folders; expected {root}/<class>/<image files>")
    out = {}
    for c in classes:
        files = sorted(p for p in c.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise TrainingError(f"class folder {c} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove it")
        out[c.name] = files
    return out


def _to_labeled(entries: dict[str, list[Path]], classes: list[str], where: Path) -> LabeledFiles:
    unknown = sorted(set(entries) - set(classes))
    if unknown:
        raise TrainingError(
            f"{where} has classes not in the training data: {', '.join(unknown)}; every val/test class needs training images"
        )
    paths, labels = [], []
    for name, files in entries.items():
        paths += files
        labels += [classes.index(name)] * len(files)
    return LabeledFiles(paths, np.asarray(labels, dtype=np.int64), classes)


def _check_classes(classes: list[str], where: Path) -> None:
    if len(classes) < 2:
        raise TrainingError(f"{where} has {len(classes)} class(es) ({', '.join(classes)}); a classifier needs at least 2")


def _read_manifest(csv_path: Path) -> dict[str, dict[str, list[Path]]]:
    """CSV with header path,label[,split]; relative paths are relative to the CSV's folder."""
    by_split: dict[str, dict[str, list[Path]]] = {}
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise TrainingError(f"manifest {csv_path} needs a header row with columns path,label (and optionally split)")
        for line, row in enumerate(reader, start=2):
            path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            split = (row.get("split") or "train").strip() or "train"
            if not path or not label:
                raise TrainingError(f"manifest {csv_path} line {line}: empty path or label")
            if split not in SPLITS:
                raise TrainingError(f"manifest {csv_path} line {line}: split '{split}' is not one of {', '.join(SPLITS)}")
            p = Path(path) if Path(path).is_absolute() else csv_path.parent / path
            by_split.setdefault(split, {}).setdefault(label, []).append(p)
    if "train" not in by_split:
        raise TrainingError(f"manifest {csv_path} has no training rows")
    return by_split


def discover(data: Path, test_dir: Path | None = None) -> DataSource:
    """Find the labeled splits in `data` (ImageFolder, train/val/test folders, or a .csv manifest)."""
    data = Path(data)
    if not data.exists():
        raise TrainingError(f"data path {data} does not exist")
    if data.is_file() and data.suffix.lower() == ".csv":
        by_split = _read_manifest(data)
        layout = "manifest"
    elif (data / "train").is_dir():
        by_split = {s: _folder_entries(data / s) for s in SPLITS if (data / s).is_dir()}
        layout = "splits"
    else:
        by_split = {"train": _folder_entries(data)}
        layout = "imagefolder"
    classes = sorted(by_split["train"])
    _check_classes(classes, data)
    src = DataSource(train=_to_labeled(by_split["train"], classes, data), origin={"data": str(data), "layout": layout})
    for s in ("val", "test"):
        if s in by_split:
            setattr(src, s, _to_labeled(by_split[s], classes, data / s))
    if test_dir is not None:
        if src.test is not None:
            raise TrainingError(f"{data} already has a test split; drop --test-dir or remove {data}/test")
        src.test = _to_labeled(_folder_entries(Path(test_dir)), classes, Path(test_dir))
        src.origin["test_dir"] = str(test_dir)
    return src


def labeled_folder(root: Path, classes: list[str]) -> LabeledFiles:
    """An ImageFolder scored against a known class list (e.g. a trained run's)."""
    return _to_labeled(_folder_entries(Path(root)), classes, Path(root))
