"""`cnnloop evaluate`: score a finished run on any labeled folder."""
from __future__ import annotations

from pathlib import Path

from training.data import augment
from training.data.sources import labeled_folder
from training.loop.steps import predict, resolve_device
from training.errors import TrainingError
from training.data.decode import decode_files
from training.scoring.metrics import classification_scores
from training.scoring.plots import plot_confusion
from training.run.files import load_run, write_json


def evaluate_run(run_dir: Path, data: Path, out: Path | None = None, device: str = "auto") -> dict:
    run = load_run(run_dir)
    files = labeled_folder(Path(data), run.classes)
    decoded, skipped = decode_files(files, run.policy.resize_size)
    if len(decoded) == 0:
        raise TrainingError(f"no decodable images in {data}")
    probs, _ = predict(run.model.to(resolve_device(device)), augment.eval_crop(decoded.images, run.policy), resolve_device(device))
    scores = classification_scores(decoded.labels.numpy(), probs, run.classes)
    scores["skipped_images"] = skipped
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "scores.json", scores)
        plot_confusion(scores["confusion_matrix"], run.classes, out / "confusion.png", f"{Path(data).name} confusion")
    return scores
