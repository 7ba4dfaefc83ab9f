"""The retrain job end to end on real (small) models: a real registry, a real SQLite prediction log,
real ONNX predictions as the logged traffic. Slow-ish: each test trains for a few seconds."""
from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from rich.console import Console

from exporters.onnx_runtime import load_bundle_model
from exporters.prediction_log import PredictionRecord, SqlitePredictionLog, encode_embedding, new_record_id
from exporters.preprocess import ResizePolicy, load_model_input
from exporters.reference_stats import load_reference, project
from exporters.registry import Registry
from exporters.storage import open_store
from tests.training_data import fast_config, make_digits
from training.fit import train
from training.publish import publish_run
from training.retrain import audit
from training.retrain.gate import Holdout, promotion_verdict, score_bundle
from training.retrain.job import retrain_once
from training.retrain.lock import LockHeld, StoreLock
from training.retrain.settings import LoopSettings

pytestmark = pytest.mark.slow
DIGITS = (0, 1, 7)
console = Console(quiet=True)


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrain")
    everything = make_digits(tmp / "all", digits=DIGITS, per_class=70)
    train_dir, traffic = tmp / "train", []
    for cls in sorted(p.name for p in everything.iterdir()):
        files = sorted((everything / cls).iterdir())
        (train_dir / cls).mkdir(parents=True)
        for f in files[:35]:
            shutil.copyfile(f, train_dir / cls / f.name)
        traffic += [(f, cls) for f in files[35:]]
    train(train_dir, tmp / "run", fast_config(epochs=3, strategy="finetune", lr=3e-3), show_progress=False)
    registry_dir = tmp / "registry"
    version, _ = publish_run(tmp / "run", Registry.open(str(registry_dir)), (), 1.0, None)
    return {"tmp": tmp, "registry_dir": registry_dir, "version": version, "traffic": traffic, "run": tmp / "run",
            "train_dir": train_dir}


@pytest.fixture
def loop(champion, tmp_path):
    """A fresh registry copy (production = the champion) and an empty prediction log per test."""
    registry_dir = tmp_path / "registry"
    shutil.copytree(champion["registry_dir"], registry_dir)
    Registry.open(str(registry_dir)).promote(champion["version"])
    # test_tolerance 0.1: the original test split here is 16 images, one of them is 6 points.
    settings = LoopSettings(registry=str(registry_dir), data_dir=str(tmp_path / "data"), work_dir=tmp_path / "work",
                            window=100, min_samples=60, min_new_labels=20, cooldown_s=0, permutations=200, epochs=3,
                            variants="none", device="cpu", test_tolerance=0.1)
    return settings, Registry.open(str(registry_dir))


def png_bytes(path: Path, shift: bool) -> bytes:
    """`shift`: inverted and turned 90 degrees, which a model that saw neither gets mostly wrong."""
    with Image.open(path) as im:
        im = ImageOps.invert(im.convert("L")).rotate(90) if shift else im.convert("L")
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()


def log_traffic(settings: LoopSettings, registry: Registry, items, shift: bool, feedback: bool) -> float:
    """What the service does for each image: predict with the production graph, log it, store the bytes;
    then the client's true label as feedback. Returns the accuracy served."""
    bundle = registry.fetch(registry.resolve("production"), settings.work_dir / "client-bundles")
    model, meta = load_bundle_model(bundle, variant="fp32", prefer_gpu=False)
    ref = load_reference(bundle / "reference.npz")
    policy = ResizePolicy.from_bundle(meta)
    datas = [png_bytes(p, shift) for p, _ in items]
    images = np.stack([load_model_input(d, policy) for d in datas])
    probs, emb = model.predict(images)
    proj = project(emb, ref["pca_mean"], ref["pca_components"])
    log = SqlitePredictionLog(settings.data_dir)
    records = []
    import hashlib

    for i, (d, (_, label)) in enumerate(zip(datas, items)):
        sha = hashlib.sha256(d).hexdigest()
        log.store_image(sha, d)
        k = int(probs[i].argmax())
        records.append(PredictionRecord(new_record_id(), 0.0, meta["version"], meta["labels"][k], float(probs[i, k]),
                                        probs[i].tolist(), sha, True, "x.png", encode_embedding(proj[i]), "pca"))
    for r in records:
        r.created_at = float(int(r.prediction_id[:12], 16)) / 1000
    log.add_predictions(records)
    correct = 0
    for r, (_, label) in zip(records, items):
        correct += r.label == label
        if feedback:
            log.record_feedback(r.prediction_id, label)
    log.close()
    return correct / len(items)


def test_clean_traffic_is_no_drift_and_no_retrain(champion, loop):
    settings, registry = loop
    log_traffic(settings, registry, champion["traffic"][:100], shift=False, feedback=True)
    record = retrain_once(settings, console, show_progress=False)
    assert record["outcome"]["status"] == "skipped"
    assert record["report"]["status"] == "no_drift" and not record["decision"]["retrain"]
    assert registry.resolve("production") == champion["version"]
    assert audit.read_decisions(open_store(settings.data_dir))[-1]["decision"]["reasons"]


def test_shifted_traffic_is_detected_retrained_and_the_better_challenger_promoted(champion, loop):
    settings, registry = loop
    before = log_traffic(settings, registry, champion["traffic"], shift=True, feedback=True)
    assert before < 0.8, "the shift must hurt the champion for this test to mean anything"
    record = retrain_once(settings, console, show_progress=False)
    assert record["report"]["drift_detected"] and record["decision"]["retrain"], record["decision"]
    out = record["outcome"]
    assert out["status"] == "promoted", out["verdict"]
    assert registry.resolve("production") == out["challenger"] != champion["version"]
    assert registry.show(out["challenger"])["parent_version"] == champion["version"]
    ev = out["evaluation"]
    assert ev["challenger"]["feedback"]["accuracy"] > max(before, ev["champion"]["feedback"]["accuracy"])
    # the challenger's bundle can warm-start the next retrain and replays the same original data
    assert (settings.work_dir / "bundles" / out["challenger"] / "weights.safetensors").is_file()


def test_a_crash_mid_retrain_leaves_production_untouched_and_frees_the_lock(champion, loop, monkeypatch):
    settings, registry = loop
    log_traffic(settings, registry, champion["traffic"][:90], shift=True, feedback=True)

    def crash(*a, **k):
        raise RuntimeError("disk full while exporting")

    monkeypatch.setattr("training.retrain.job.publish_run", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        retrain_once(settings, console, force=True, show_progress=False)
    assert registry.resolve("production") == champion["version"]
    assert registry.resolve("candidate") is None
    last = audit.read_decisions(open_store(settings.data_dir))[-1]
    assert last["outcome"]["status"] == "failed" and "disk full" in last["outcome"]["error"]
    StoreLock(open_store(settings.data_dir), 60).acquire().release()


def test_the_lock_keeps_a_second_run_out(champion, loop):
    settings, registry = loop
    store = open_store(settings.data_dir)
    with StoreLock(store, 600):
        with pytest.raises(LockHeld):
            retrain_once(settings, console, force=True, show_progress=False)
    assert audit.read_decisions(store) == []
    assert registry.resolve("production") == champion["version"]


def test_a_challenger_trained_on_shuffled_labels_is_never_promoted(champion, loop, tmp_path):
    settings, registry = loop
    shuffled = tmp_path / "shuffled"
    files = sorted(champion["train_dir"].rglob("*.png"))
    labels = [f.parent.name for f in files]
    random.Random(0).shuffle(labels)
    for f, label in zip(files, labels):
        (shuffled / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, shuffled / label / f.name)
    train(shuffled, tmp_path / "run", fast_config(epochs=3, strategy="finetune", lr=3e-3), show_progress=False)
    challenger, _ = publish_run(tmp_path / "run", registry, (), 1.0, champion["version"])
    held = champion["traffic"]
    bundles = settings.work_dir / "b"
    policy = ResizePolicy.from_bundle(registry.show(champion["version"]))
    holdout = Holdout(np.stack([load_model_input(p, policy) for p, _ in held]), np.array([DIGITS.index(int(c)) for _, c in held]),
                      np.full(len(held), "original_test"), policy)
    scores = [score_bundle(registry.fetch(v, bundles), holdout) for v in (champion["version"], challenger)]
    promote, reasons = promotion_verdict(scores[0], scores[1], margin=0.01, tolerance=0.02)
    assert not promote, reasons
    assert scores[1]["holdout"]["accuracy"] < scores[0]["holdout"]["accuracy"]
