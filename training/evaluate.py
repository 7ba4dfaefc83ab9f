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
from training.run.files import CALIBRATION, load_run, read_json, write_json
from training.scoring.confidence import confidence_report, plot_confidence
from exporters.calibration import Calibration


def evaluate_run(run_dir: Path, data: Path, out: Path | None = None, device: str = "auto") -> dict:
    run = load_run(run_dir)
    files = labeled_folder(Path(data), run.classes)
    decoded, skipped = decode_files(files, run.policy.resize_size)
    if len(decoded) == 0:
        raise TrainingError(f"no decodable images in {data}")
    probs, _ = predict(run.model.to(resolve_device(device)), augment.eval_crop(decoded.images, run.policy), resolve_device(device))
    scores = classification_scores(decoded.labels.numpy(), probs, run.classes)
    scores["skipped_images"] = skipped
    calibration = Calibration.from_json(read_json(Path(run_dir) / CALIBRATION)) if (Path(run_dir) / CALIBRATION).is_file() else None
    if calibration is not None:
        scores["calibration"] = calibration.to_json()
        scores.update(confidence_report(calibration, probs, decoded.labels.numpy(), run.classes))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "scores.json", scores)
        plot_confusion(scores["confusion_matrix"], run.classes, out / "confusion.png", f"{Path(data).name} confusion")
        if calibration is not None:
            plot_confidence(out, calibration, scores)
    return scores
