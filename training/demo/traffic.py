"""The demo's clients: real images over real HTTP to the running service, and a reviewer who labels what
the review queue hands out (the true label: a careful person).

The shift is inverted digits (light ink on dark paper): the kind of change a new scanner brings,
which a model trained on dark-on-light scans gets mostly wrong.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageOps

BATCH = 16


@dataclass
class TrafficResult:
    n: int
    correct: int
    versions: list[str]

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


def image_bytes(path: Path, invert: bool) -> bytes:
    with Image.open(path) as im:
        # The PNG sent carries no EXIF: apply its Orientation first, so the service sees the photo as it displays.
        im = ImageOps.exif_transpose(im).convert("L")
        if invert:
            im = ImageOps.invert(im)
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()


def send_images(client: httpx.Client, paths: list[Path], labels: list[str], invert: bool, feedback: bool) -> TrafficResult:
    """POST /predict in batches; with `feedback`, POST each true label to /feedback. Returns accuracy as served."""
    correct, versions = 0, set()
    for start in range(0, len(paths), BATCH):
        chunk = range(start, min(start + BATCH, len(paths)))
        files = [("images", (f"{Path(paths[i]).stem}.png", image_bytes(paths[i], invert), "image/png")) for i in chunk]
        r = client.post("/predict", files=files)
        r.raise_for_status()
        body = r.json()
        versions.add(body["model_version"])
        for i, answer in zip(chunk, body["predictions"]):
            correct += answer["label"] == labels[i]
            if feedback:
                client.post("/feedback", json={"prediction_id": answer["prediction_id"], "label": labels[i]}).raise_for_status()
    return TrafficResult(len(paths), correct, sorted(versions))


def wait_until_logged(client: httpx.Client, timeout_s: float = 60) -> None:
    """Wait until the service's log writer has committed every prediction it answered (GET /info: log.queued),
    so a drift check that follows sees exactly the traffic sent."""
    deadline = time.monotonic() + timeout_s
    while (client.get("/info").json().get("log") or {}).get("queued", 0) > 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the service's prediction log did not drain within {timeout_s:.0f}s")
        time.sleep(0.1)


def wait_for_version(client: httpx.Client, version: str, timeout_s: float = 120) -> float:
    """Ask the service to re-check its alias, then wait until it serves `version`; returns seconds waited."""
    t0 = time.monotonic()
    client.post("/admin/reload")
    while time.monotonic() - t0 < timeout_s:
        model = client.get("/info").json().get("model") or {}
        if model.get("version") == version:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise TimeoutError(f"the service did not swap to {version} within {timeout_s:.0f}s")


def split_pool(n: int, sizes: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Disjoint random index sets with the given shares of range(n)."""
    order = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for name, share in sizes.items():
        k = int(round(share * n))
        out[name] = np.sort(order[start:start + k])
        start += k
    return out


@dataclass
class ReviewResult:
    labeled: int
    skipped: int  # evaluation images the queue offered: never labeled, so no model trains on them
    correct_before: int  # of the labeled, how many the model had right (the queue should pick its mistakes)


def review_labels(client: httpx.Client, truth: dict[str, str], budget: int, reserved: set[str],
                  reviewer: str = "demo-reviewer", batch: int = 10) -> ReviewResult:
    """Label `budget` images through the review queue (POST /review/next, /review/answer), the true label
    looked up by the uploaded filename. Images in `reserved` (evaluation sets) are skipped."""
    labeled = skipped = correct = 0
    while labeled < budget:
        body = client.post("/review/next", json={"reviewer": reviewer, "count": min(batch, budget - labeled)})
        body.raise_for_status()
        items = body.json()["items"]
        if not items:
            break
        lease = body.json()["lease_id"]
        for item in items:
            name = item["filename"]
            if name in reserved or name not in truth:
                client.post("/review/answer", json={"lease_id": lease, "prediction_id": item["prediction_id"],
                                                    "skip": True}).raise_for_status()
                skipped += name in reserved
                continue
            client.post("/review/answer", json={"lease_id": lease, "prediction_id": item["prediction_id"],
                                                "label": truth[name]}).raise_for_status()
            labeled += 1
            correct += item["predicted_label"] == truth[name]
    return ReviewResult(labeled, skipped, correct)
