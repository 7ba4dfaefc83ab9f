"""What a retrain learns from and is judged on: the original splits replayed + the labeled examples.

Labeled examples are the prediction log's feedback (labels given on predictions) and labeled uploads
(new images sent with a label); the retrain settings and the audit record call them all "feedback"
(`feedback_holdout`, `counts["feedback"]`), names kept because scripts and configs use them.
They are split by their image's content hash, so an image keeps its role (train, early-stopping
val, or holdout) across every retrain: a challenger is never judged on an image an earlier model
trained on. The original test split stays a holdout too, so "better on the new traffic" can be
weighed against "worse on the old".
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporters.prediction_log.records import PredictionLog
from training.data.sources import LabeledFiles
from training.errors import TrainingError
from training.data.splits import Splits
from training.data.decode import DecodedImages, decode_files

MAX_FEEDBACK_REPEAT = 20


@dataclass(frozen=True)
class FeedbackShares:
    """How a retrain uses its labeled examples (the retrain settings feedback_holdout, feedback_val, feedback_weight)."""

    holdout: float  # share held out to judge champion and challenger
    val: float  # share of the rest that early stopping watches
    weight: float  # share of each epoch's training images they make up, by repetition


@dataclass
class RetrainData:
    splits: Splits  # train: original + labeled examples (repeated); val: original + labeled examples; test: original
    holdout_feedback: DecodedImages
    counts: dict


def concat(parts: list[DecodedImages], classes: list[str], size: int) -> DecodedImages:
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return DecodedImages(torch.empty((0, 3, size, size), dtype=torch.uint8), torch.empty(0, dtype=torch.long), [], classes)
    return DecodedImages(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                         [q for p in parts for q in p.paths], classes)


def labeled_example_role(sha256: str, holdout: float, val: float) -> str:
    """'holdout', 'val' or 'train', fixed per image by its hash (uniform in [0, 1))."""
    u = int(sha256[:12], 16) / float(16**12)
    if u < holdout:
        return "holdout"
    return "val" if u < holdout + (1 - holdout) * val else "train"


def read_original_splits(path: Path, classes: list[str], rebase_to: Path | None) -> dict[str, LabeledFiles | None]:
    doc = json.loads(Path(path).read_text())
    names = ("train", "val", "test")
    every = [p for n in names for p in (doc.get(n) or [])]
    root = Path(os.path.commonpath(every)) if every else None
    out: dict[str, LabeledFiles | None] = {}
    for name in names:
        paths = doc.get(name)
        if not paths:
            out[name] = None
            continue
        if rebase_to is not None and root is not None:
            paths = [str(Path(rebase_to) / Path(p).relative_to(root)) for p in paths]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise TrainingError(f"{len(missing)} original {name} image(s) are missing, e.g. {missing[0]}; the retrain replays the "
                                f"original training data: mount it there, or set CNNLOOP_ORIGINAL_DATA (--original-data) to the "
                                f"folder that now holds what was under {root}")
        out[name] = LabeledFiles([Path(p) for p in paths], np.asarray(doc["labels"][name], dtype=np.int64), classes)
    if out["train"] is None or out["val"] is None:
        raise TrainingError(f"{path} lists no train or val split; the production bundle cannot be retrained")
    return out


def latest_labels(log: PredictionLog, classes: list[str]) -> dict[str, tuple[float, str]]:
    """sha256 -> (when, label): the newest label per image, whether feedback or a labeled upload gave it.
    Labels outside `classes` cannot occur: the service accepts only the serving model's labels, and a
    retrain keeps the label set."""
    latest: dict[str, tuple[float, str]] = {}
    for ex in log.labeled_examples():
        if ex.label in classes and (ex.image_sha256 not in latest or ex.labeled_at >= latest[ex.image_sha256][0]):
            latest[ex.image_sha256] = (ex.labeled_at, ex.label)
    return latest


def build_retrain_data(original: dict[str, LabeledFiles | None], log: PredictionLog, classes: list[str], size: int,
                       cache_dir: Path, shares: FeedbackShares, progress=None, suspect: set[str] = frozenset(),
                       suspect_policy: str = "exclude") -> RetrainData:
    """The original splits, decoded at `size`, and the log's newest label per image, each image fetched once
    into `cache_dir` and given its role by its hash.

    `suspect`: images whose label the label check flagged. "exclude" leaves them out; "downweight"
    trains on those whose role is train once instead of repeating them, and leaves the others out
    (a suspect label must not judge a model, and its image keeps its role for later retrains);
    "keep" uses them like any other."""
    latest = latest_labels(log, classes)
    index = {c: i for i, c in enumerate(classes)}
    roles: dict[str, tuple[list[Path], list[int]]] = {"train": ([], []), "val": ([], []), "holdout": ([], []), "once": ([], [])}
    cache_dir.mkdir(parents=True, exist_ok=True)
    set_aside = 0
    for sha, (_, label) in sorted(latest.items()):
        role = labeled_example_role(sha, shares.holdout, shares.val)
        if sha in suspect and suspect_policy != "keep":
            if suspect_policy == "exclude" or role != "train":
                set_aside += 1
                continue
            role = "once"
        path = cache_dir / sha[:2] / sha
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")
            tmp.write_bytes(log.image_bytes(sha))
            tmp.replace(path)
        paths, labels = roles[role]
        paths.append(path)
        labels.append(index[label])
    decoded, skipped = {}, []
    for name, files in original.items():
        if files is not None:
            decoded[name], bad = decode_files(files, size, f"decoding original {name}", progress)
            skipped += bad
    fb = {}
    for role, (paths, labels) in roles.items():
        fb[role], bad = decode_files(LabeledFiles(paths, np.asarray(labels, dtype=np.int64), classes), size,
                                     f"decoding labeled examples {role}", progress)
        skipped += bad
    n_orig, n_fb = len(decoded["train"]), len(fb["train"])
    # Repeat labeled examples until they are `feedback_weight` of an epoch; the original data is replayed in full
    # so the model does not forget what it knew.
    repeat = 0 if n_fb == 0 else max(1, min(MAX_FEEDBACK_REPEAT, math.ceil(shares.weight / (1 - shares.weight) * n_orig / n_fb)))
    train = concat([decoded["train"]] + [fb["train"]] * repeat + [fb["once"]], classes, size)
    val_set = concat([decoded["val"], fb["val"]], classes, size)
    counts = {"original": {k: (len(v) if v is not None else 0) for k, v in decoded.items()},
              "feedback": {k: len(v) for k, v in fb.items() if k != "once"}, "feedback_repeat": repeat,
              # Flagged by the label check: left out, or (downweight) trained on once.
              "suspect_labels": {"set_aside": set_aside, "trained_once": len(fb["once"])},
              "skipped_images": len(skipped),
              # Feedback on predictions whose image was not stored: reported, since no retrain can use it.
              "feedback_without_image": log.feedback_without_image()}
    return RetrainData(Splits(train, val_set, decoded.get("test"), skipped, carved=[]), fb["holdout"], counts)
