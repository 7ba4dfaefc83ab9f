"""The retrain job end to end on real (small) models: a real registry, a real prediction log (SQLite and PostgreSQL),
real ONNX predictions as the logged traffic. Slow-ish: each test trains for a few seconds."""
from __future__ import annotations

import asyncio
import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from prometheus_client import CollectorRegistry
from rich.console import Console

from exporters.preprocess import ResizePolicy, load_model_input
from exporters.model_store.registry import Registry
from exporters.prediction_log.review_queue import ReviewQueue
from exporters.prediction_log.sql import open_prediction_log
from exporters.storage import open_store
from service.metrics import ServiceMetrics
from service.request_validation import FeedbackIn, Upload
from service.runtime import ServingRuntime
from service.settings import load_service_settings
from tests.log_backends import backend, log_url_for  # noqa: F401  (fixture: every test on SQLite and PostgreSQL)
from tests.training_data import fast_config, make_digits
from training.retrain import audit
from training.retrain.gate import Holdout, promotion_verdict, score_bundle
from training.retrain.job import retrain_once
from training.retrain.lock import LockHeld, StoreLock
from training.retrain.settings import LoopSettings
from training.run.publish import publish_run
from training.train import train

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
def loop(champion, tmp_path, request, backend):
    """A fresh registry copy (production = the champion) and an empty prediction log per test, on each log backend."""
    registry_dir = tmp_path / "registry"
    shutil.copytree(champion["registry_dir"], registry_dir)
    Registry.open(str(registry_dir)).promote(champion["version"])
    # test_tolerance 0.1: the original test split here is 16 images, one of them is 6 points.
    settings = LoopSettings(registry=str(registry_dir), data_dir=str(tmp_path / "data"), work_dir=tmp_path / "work",
                            window=100, min_samples=60, min_new_labels=20, cooldown_s=0, permutations=200, epochs=3,
                            variants="none", device="cpu", test_tolerance=0.1, log_url=log_url_for(request, backend))
    return settings, Registry.open(str(registry_dir))


def png_bytes(path: Path, shift: bool) -> bytes:
    """`shift`: inverted and turned 90 degrees, which a model that saw neither gets mostly wrong."""
    with Image.open(path) as im:
        im = ImageOps.invert(im.convert("L")).rotate(90) if shift else im.convert("L")
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()


def log_traffic(settings: LoopSettings, registry: Registry, items, shift: bool, feedback: bool,
                given: list[str] | None = None) -> float:
    """The service's own runtime serves the images (the production graph; records and bytes logged as
    in production), then the client's true labels (or `given` ones) come back as feedback. Returns the accuracy served."""
    service_settings = load_service_settings(environ={}, overrides={
        "registry": settings.registry, "data_dir": settings.data_dir, "log_url": settings.log_url, "variant": "fp32", "prefer_gpu": False,
        "poll_interval_s": 0, "store_sample_rate": 1.0, "bundle_cache_dir": settings.work_dir / "client-bundles"})
    uploads = [Upload(f"{i}.png", png_bytes(path, shift)) for i, (path, _) in enumerate(items)]

    async def serve() -> list[dict]:
        runtime = ServingRuntime(service_settings, ServiceMetrics(CollectorRegistry()))
        await runtime.start()
        try:
            answers = (await runtime.predict(uploads))["predictions"]
            assert not [a for a in answers if a.get("logged") is False], "the prediction log refused the traffic"
            if feedback:
                for answer, label in zip(answers, given or [label for _, label in items]):
                    await runtime.feedback(FeedbackIn(prediction_id=answer["prediction_id"], label=label))
            return answers
        finally:
            await runtime.stop()

    answers = asyncio.run(serve())
    return sum(answer["label"] == label for answer, (_, label) in zip(answers, items)) / len(items)


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
    challenger_dir, champion_dir = (settings.work_dir / "bundles" / v for v in (out["challenger"], champion["version"]))
    assert (challenger_dir / "model.safetensors").is_file() and (challenger_dir / "model.json").is_file()
    assert (challenger_dir / "original_splits.json").read_bytes() == (champion_dir / "original_splits.json").read_bytes()


def test_wrong_labels_are_flagged_left_out_sent_back_for_review_and_audited(champion, loop):
    settings, registry = loop
    items = champion["traffic"]
    rng = np.random.default_rng(0)
    wrong = set(rng.choice(len(items), size=len(items) // 7, replace=False).tolist())  # a careless reviewer: 14%
    given = [str(rng.choice([d for d in DIGITS if str(d) != label])) if i in wrong else label
             for i, (_, label) in enumerate(items)]
    log_traffic(settings, registry, items, shift=True, feedback=True, given=given)
    log = open_prediction_log(settings.data_dir, log_url=settings.log_url)
    try:
        by_name = {int(Path(r.filename).stem): r for r in log.labeled_predictions()}
        wrong_ids = {by_name[i].prediction_id for i in wrong}
        record = retrain_once(settings, console, force=True, show_progress=False)
        check = record["outcome"]["label_check"]
        flagged = set(check["flagged"])
        assert check["policy"] == "exclude" and check["checked"] == len(items) and check["methods"]
        hits = len(flagged & wrong_ids)
        assert hits / len(flagged) >= 0.6 and hits / len(wrong_ids) >= 0.6, (len(flagged), hits, len(wrong_ids))
        # Left out of training and of the holdout: only unflagged labels reach the data.
        counts = record["outcome"]["data"]
        assert counts["suspect_labels"] == {"set_aside": len(flagged), "trained_once": 0}
        assert sum(counts["feedback"].values()) == len(items) - len(flagged)
        # Back in the review queue, ahead of everything else, with the reason the page shows.
        queue = ReviewQueue(log)
        leased, _ = queue.lease("second-look", 50, 60, spread=False)
        assert {i.prediction.prediction_id for i in leased[:len(flagged)]} == flagged
        assert {i.reason for i in leased[:len(flagged)]} == {"label_check"}
        # A second look that keeps the label is trusted by the next check; the audit log lists the flags.
        item = leased[0]
        queue.answer(item.lease_id, item.prediction.prediction_id, item.prediction.feedback_label, "second-look")
        assert item.prediction.prediction_id in queue.second_looks()
        assert set(audit.read_decisions(open_store(settings.data_dir))[-1]["outcome"]["label_check"]["flagged"]) == flagged
    finally:
        log.close()


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


def republish_in_old_layout(registry: Registry, version: str, work: Path) -> str:
    """`version` again as bundles were published before the torch weights took the run directory's
    names: weights.safetensors and weights.json, named so in bundle.json's retrain entry."""
    old = work / "old-layout"
    shutil.copytree(registry.fetch(version, work / "fetched"), old)
    (old / "model.safetensors").rename(old / "weights.safetensors")
    (old / "model.json").rename(old / "weights.json")
    metadata = {k: v for k, v in registry.show(version).items() if k not in ("version", "files", "created_at")}
    metadata["retrain"] = {"weights": "weights.safetensors", "weights_info": "weights.json",
                           "original_splits": "original_splits.json"}
    return registry.publish(old, metadata)


def test_a_champion_published_with_the_old_weight_names_still_warm_starts_a_retrain(champion, loop):
    settings, registry = loop
    old = republish_in_old_layout(registry, champion["version"], settings.work_dir / "old")
    assert "weights.safetensors" in registry.show(old)["files"] and "model.safetensors" not in registry.show(old)["files"]
    registry.promote(old)
    log_traffic(settings, registry, champion["traffic"][:90], shift=True, feedback=True)
    out = retrain_once(settings, console, force=True, show_progress=False)["outcome"]
    assert out["status"] in ("promoted", "kept_champion"), out
    assert json.loads((Path(out["run_dir"]) / "metrics.json").read_text())["warm_start_from"] == old
    challenger = registry.show(out["challenger"])
    assert challenger["parent_version"] == old and challenger["retrain"]["weights"] == "model.safetensors"


# SQLite only: the race is in the registry, which is the same whichever log the job reads, and each
# retrain here costs minutes of a 2-core CI.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_production_moved_during_the_retrain_stands_and_the_better_challenger_stays_candidate(champion, loop, monkeypatch):
    settings, registry = loop
    hotfix = republish_in_old_layout(registry, champion["version"], settings.work_dir / "hotfix")  # any other complete version
    log_traffic(settings, registry, champion["traffic"], shift=True, feedback=True)  # a challenger that wins
    publish = Registry.publish

    def publish_while_someone_promotes(self, bundle_dir, metadata, **kw):
        version = publish(self, bundle_dir, metadata, **kw)
        # Between the job publishing its challenger and promoting it, a person promotes another
        # version through their own registry handle: the job read production long before.
        Registry.open(settings.registry).promote(hotfix, "production")
        return version

    monkeypatch.setattr(Registry, "publish", publish_while_someone_promotes)
    record = retrain_once(settings, console, force=True, show_progress=False)
    out = record["outcome"]
    ev = out["evaluation"]
    assert ev["challenger"]["holdout"]["accuracy"] >= ev["champion"]["holdout"]["accuracy"] + settings.promote_margin, \
        "the challenger must deserve promotion for the test to mean anything"
    assert registry.resolve("production") == hotfix, "the retrain replaced a version promoted meanwhile"
    assert registry.resolve("candidate") == out["challenger"] != hotfix
    assert out["status"] == "kept_champion" and out["production"] == hotfix
    assert "production moved during the retrain" in out["verdict"]
    assert audit.read_decisions(open_store(settings.data_dir))[-1]["outcome"] == out
