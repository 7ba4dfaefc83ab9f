"""Label budget: how much shifted-traffic accuracy the review queue buys per label, on real data.

A champion trained on the original data is published as production and served (real `cnnloop serve`);
shifted traffic goes through POST /predict (no feedback), so the service logs every prediction and
stores its image. A simulated reviewer (the dataset's true label) then labels only what the review
queue (exporters.prediction_log.review_queue, filled as the service's review desk fills it) hands out,
in leases of 10, until a budget of 5%, 10%, 20% or 100% of the shifted stream is spent; the real
retrain job (`retrain_once`, forced) retrains on those labels; the production model after the pass
(promoted or kept, whatever the gate decided) and the challenger are scored through ONNX Runtime on a
held-out shifted test set that no step saw. Budget 0 is the champion before any label.

Shifts: `digits` (the demo's inverted digits: 40% of scikit-learn's digits never reach training, 60%
of those inverted are the stream, 40% the shifted test) and `hymenoptera` (real photos; the champion
trains on hymenoptera/train, the val/ photos are the traffic under a change of camera: darker
(brightness x0.5), blurred (Gaussian radius 2), JPEG quality 15).

Baseline: `random` sampling, the peer users have (Label Studio's free edition hands out tasks in
order or at random); against it the queue's `margin` (the service's default), `entropy` and
`novelty`, all with the batch spread on (the default). Every strategy works on a copy of the same
logged traffic, so the strategies of a seed differ only in which items the queue handed out.

    python bench/label_budget.py --shifts digits --seeds 0,1,2        # ~1 min per cell on 2 cores
    python bench/label_budget.py --flip 0,0.1,0.2 --label-check exclude,keep   # noisy reviewers
    python bench/label_budget.py --report-only                         # tables + PNG from the JSON

Writes bench/results/label_budget.json (every cell; rewritten after each one), a Markdown table
(bench/results/label_budget.md) and docs/label_budget.png.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEASE_BATCH = 10
LEASE_SECONDS = 300.0
REVIEWER = "simulated-reviewer"
STREAM_SHARE = 0.6  # of the shifted pool; the rest is the shifted test set
HYM_RECIPE = {"backbone": "efficientnet_lite0", "image_size": 160, "epochs": 4, "strategy": "finetune", "lr": 2e-3,
              "patience": 3}
CAMERA = {"brightness": 0.5, "blur_radius": 2.0, "jpeg_quality": 15}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- data -------------------------------------------------------------------------------------------

def camera_change(src: Path) -> bytes:
    """A worse camera, deterministic: darker, blurred, heavy JPEG compression."""
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im = ImageEnhance.Brightness(im).enhance(CAMERA["brightness"])
        im = im.filter(ImageFilter.GaussianBlur(CAMERA["blur_radius"]))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=CAMERA["jpeg_quality"])
        return buf.getvalue()


def shifted_pool(shift: str, base: Path, hym: Path, console):
    """(train_dir, recipe, items): items = [(name sent, shifted bytes, true label)] of the whole shifted pool."""
    from training.data.sources import discover

    if shift == "digits":
        from training.demo.loop import DEMO_RECIPE, prepare_digits
        from training.demo.traffic import image_bytes

        train_dir, pool = prepare_digits(base / "digits-data", console)
        items = [(f"{Path(p).stem}.png", image_bytes(p, invert=True), pool.classes[pool.labels[i]])
                 for i, p in enumerate(pool.paths)]
        return train_dir, dict(DEMO_RECIPE), items
    if shift == "hymenoptera":
        if not (hym / "train").is_dir() or not (hym / "val").is_dir():
            raise SystemExit(f"hymenoptera dataset not found at {hym} (needs train/ and val/); pass --hymenoptera PATH")
        pool = discover(hym / "val").train
        items = [(f"{Path(p).stem}.jpg", camera_change(Path(p)), pool.classes[pool.labels[i]]) for i, p in enumerate(pool.paths)]
        return hym / "train", dict(HYM_RECIPE), items
    raise SystemExit(f"unknown shift {shift!r}; use digits or hymenoptera")


def split_stream_test(n: int, labels: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified: STREAM_SHARE of each class to the stream, the rest to the shifted test set."""
    rng = np.random.default_rng(1000 + seed)
    stream, test = [], []
    labels = np.asarray(labels)
    for c in sorted(set(labels.tolist())):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(STREAM_SHARE * len(idx)))
        stream += idx[:k].tolist()
        test += idx[k:].tolist()
    return np.sort(stream), np.sort(test)


def send_bytes(client, items: list[tuple[str, bytes, str]], batch: int = 16) -> tuple[int, dict[str, str]]:
    """POST /predict in batches, no feedback (send_images would re-encode as grayscale PNG, which for
    photos would be a second shift). Returns (correct as served, prediction_id -> name sent)."""
    correct, sent = 0, {}
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        files = [("images", (name, data, "image/png" if name.endswith(".png") else "image/jpeg")) for name, data, _ in chunk]
        r = client.post("/predict", files=files)
        r.raise_for_status()
        for (name, _, label), answer in zip(chunk, r.json()["predictions"]):
            correct += answer["label"] == label
            sent[answer["prediction_id"]] = name
    return correct, sent


# --- the expensive part, once per (shift, seed) ----------------------------------------------------

def setup(shift: str, seed: int, base: Path, hym: Path, console) -> dict:
    from exporters.model_store.registry import Registry
    from training.config import load_train_config
    from training.demo.service_process import start_service
    from training.demo.traffic import wait_until_logged
    from training.run.publish import publish_run
    from training.train import train

    t0 = time.perf_counter()
    train_dir, recipe, items = shifted_pool(shift, base, hym, console)
    names = [n for n, _, _ in items]
    if len(set(names)) != len(names):
        raise SystemExit(f"{shift}: upload names are not unique; cannot map logged predictions back to labels")
    stream_idx, test_idx = split_stream_test(len(items), [lab for _, _, lab in items], seed)
    session = base / f"{shift}-seed{seed}"
    if session.exists():
        shutil.rmtree(session)
    # The shifted test set on disk, exactly the bytes the service would get.
    test_dir = session / "shifted-test"
    test = []
    for i in test_idx:
        name, data, label = items[i]
        path = test_dir / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        test.append((path, label))

    log(f"{shift} seed {seed}: training the champion on {train_dir} ({recipe})")
    t = time.perf_counter()
    train(train_dir, session / "run", load_train_config(None, {**recipe, "seed": seed, "device": "cpu"}),
          console=console, show_progress=False)
    train_s = time.perf_counter() - t
    registry_dir, data_dir = session / "registry", session / "service-data"
    registry = Registry.open(str(registry_dir))
    champion, _ = publish_run(session / "run", registry, (), 1.0, None)  # fp32 only
    registry.promote(champion, "production")
    log(f"{shift} seed {seed}: champion {champion} published ({train_s:.0f}s training); serving the shifted stream")

    stream = [items[i] for i in stream_idx]
    service = start_service({"registry": registry_dir.resolve(), "data_dir": data_dir.resolve(), "poll_interval_s": 0},
                            session / "service.log")
    try:
        with service.client() as client:
            correct, sent = send_bytes(client, stream)
            wait_until_logged(client)
    finally:
        service.stop()
    truth = {name: label for name, _, label in items}
    served_acc = correct / len(stream)
    log(f"{shift} seed {seed}: {len(stream)} shifted predictions logged (served accuracy {served_acc:.3f}); "
        f"{len(test)} shifted test images held out; setup {time.perf_counter() - t0:.0f}s")
    return {"shift": shift, "seed": seed, "session": session, "registry_dir": registry_dir, "data_dir": data_dir,
            "champion": champion, "truth": truth, "n_stream": len(stream), "test": test, "epochs": recipe.get("epochs"),
            "stream_served_accuracy": served_acc, "setup_s": time.perf_counter() - t0, "train_s": train_s}


# --- scoring ------------------------------------------------------------------------------------------

_TEST_CACHE: dict = {}


def score(bundle_dir: Path, test: list[tuple[Path, str]]) -> float:
    """Accuracy of the bundle's fp32 graph on the shifted test set, preprocessed as the bundle serves."""
    from exporters.onnx_runtime import load_bundle_model
    from exporters.preprocess import load_model_input

    model, bundle = load_bundle_model(bundle_dir, variant="fp32", prefer_gpu=False)
    key = (id(test), bundle.policy)
    if key not in _TEST_CACHE:
        _TEST_CACHE[key] = np.stack([load_model_input(p, bundle.policy) for p, _ in test])
    pred = model.predict(_TEST_CACHE[key])[0].argmax(1)
    labels = list(bundle.labels)
    truth = np.array([labels.index(lab) for _, lab in test])
    return float((pred == truth).mean())


def score_version(registry_dir: Path, version: str, test, dest: Path) -> float:
    from exporters.model_store.registry import Registry

    return score(Registry.open(str(registry_dir)).fetch(version, dest), test)


# --- one cell: review queue -> labels -> retrain -> score --------------------------------------------

def review(data_dir: Path, registry_dir: Path, strategy: str, budget: int, truth: dict[str, str], flip: float,
           rng: np.random.Generator) -> tuple[int, list[str], dict]:
    """Label `budget` items as the queue hands them out; returns (labels given, flipped prediction ids, queue state)."""
    from exporters.calibration import Calibration
    from exporters.model_store.bundle import read_bundle, read_reference_stats
    from exporters.model_store.registry import Registry
    from exporters.prediction_log.review_queue import ReviewQueue
    from exporters.prediction_log.sql import open_prediction_log

    registry = Registry.open(str(registry_dir))
    version = registry.resolve("production")
    bundle = read_bundle(registry.fetch(version, data_dir.parent / "review-bundles"))
    # As the service's review desk: the bundle's calibration (abstained first) and its PCA reference sample.
    calibration = Calibration.from_json(bundle.calibration)
    reference = read_reference_stats(bundle).embeddings_pca_sample
    labels = list(bundle.labels)
    log_ = open_prediction_log(str(data_dir))
    try:
        queue = ReviewQueue(log_)
        given, flipped, per_class, champion_wrong = 0, [], {}, 0
        while given < budget:
            want = min(LEASE_BATCH, budget - given)
            # As service/review_desk.py's _refill: every reviewer call queues what arrived since the last
            # refill (here all the traffic is logged before the first call, so the first refill queues it all).
            queue.refill(version, strategy, calibration, reference, 2000)
            items, _ = queue.lease(REVIEWER, want, LEASE_SECONDS)
            if not items:
                break
            for item in items:
                rec = item.prediction
                label = truth[rec.filename]
                if flip > 0 and rng.random() < flip:
                    label = str(rng.choice([c for c in labels if c != label]))
                    flipped.append(rec.prediction_id)
                queue.answer(item.lease_id, rec.prediction_id, label, REVIEWER)
                given += 1
                per_class[truth[rec.filename]] = per_class.get(truth[rec.filename], 0) + 1
                champion_wrong += rec.label != truth[rec.filename]
        state = queue.state().as_dict() | {"labels_per_class": dict(sorted(per_class.items())),
                                           "champion_wrong_among_labeled": champion_wrong}
    finally:
        log_.close()
    return given, flipped, state


def run_cell(ctx: dict, strategy: str, share: float, flip: float, label_check: str | None, epochs: int,
             console) -> dict:
    from training.retrain.job import retrain_once
    from training.retrain.settings import LoopSettings

    t0 = time.perf_counter()
    tag = f"{strategy}-{share:g}-flip{flip:g}-{label_check or 'default'}"
    cell_dir = ctx["session"] / "cells" / tag
    if cell_dir.exists():
        shutil.rmtree(cell_dir)
    data_dir, registry_dir = cell_dir / "service-data", cell_dir / "registry"
    shutil.copytree(ctx["data_dir"], data_dir, ignore=shutil.ignore_patterns("bundles"))
    shutil.copytree(ctx["registry_dir"], registry_dir)
    budget = max(1, round(share * ctx["n_stream"]))
    seed_key = int(hashlib.sha256(f"{ctx['shift']}:{ctx['seed']}:{strategy}:{share}:{flip}".encode()).hexdigest()[:8], 16)
    given, flipped, state = review(data_dir, registry_dir, strategy, budget, ctx["truth"], flip, np.random.default_rng(seed_key))
    t_review = time.perf_counter() - t0
    extra = {}
    if label_check is not None:
        extra["label_check"] = label_check
    settings = LoopSettings(registry=str(registry_dir), data_dir=str(data_dir), work_dir=cell_dir / "retrain", variants="none",
                            cooldown_s=0, min_new_labels=0, epochs=epochs, permutations=100, window=ctx["n_stream"],
                            min_samples=max(10, min(100, ctx["n_stream"])), device="cpu", **extra)
    record = retrain_once(settings, console, force=True, show_progress=False)
    outcome = record.get("outcome") or {}
    production = outcome.get("production")
    challenger = outcome.get("challenger")
    bundles = cell_dir / "scored-bundles"
    prod_acc = score_version(registry_dir, production, ctx["test"], bundles) if production else None
    chal_acc = score_version(registry_dir, challenger, ctx["test"], bundles) if challenger else None
    check = outcome.get("label_check") if isinstance(outcome.get("label_check"), dict) else None
    flagged = list((check or {}).get("flagged") or [])
    lc = {k: v for k, v in (check or {}).items() if k in ("policy", "checked", "trusted", "unchecked", "methods")}
    lc["n_flagged"] = len(flagged)
    cell = {"label_check_summary": lc, "champion_accuracy": ctx.get("acc0"), "shift": ctx["shift"], "seed": ctx["seed"], "strategy": strategy, "budget_share": share, "labels_spent": given,
            "budget": budget, "n_stream": ctx["n_stream"], "n_test": len(ctx["test"]), "flip": flip, "label_check": label_check,
            "production_accuracy": prod_acc, "challenger_accuracy": chal_acc, "status": outcome.get("status"),
            "promoted": outcome.get("status") == "promoted", "champion": ctx["champion"], "production": production,
            "challenger": challenger, "feedback_counts": (outcome.get("data") or {}).get("feedback"),
            "gate_holdout": {k: ((outcome.get("evaluation") or {}).get(k) or {}).get("holdout") for k in ("champion", "challenger")},
            "best_epoch": outcome.get("best_epoch"), "queue_state": state,
            "review_s": round(t_review, 1), "seconds": round(time.perf_counter() - t0, 1)}
    if flip > 0 or label_check is not None:
        fl, fp = set(flagged), set(flipped)
        cell.update(flipped=sorted(fp), flagged=sorted(fl), label_check_present=check is not None,
                    flag_precision=(len(fl & fp) / len(fl)) if fl else None,
                    flag_recall=(len(fl & fp) / len(fp)) if fp else None)
    shutil.rmtree(cell_dir, ignore_errors=True)  # keep the disk small: the JSON holds what was measured
    return cell


# --- report -----------------------------------------------------------------------------------------

def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def curves(cells: list[dict], shift: str, metric: str, flip: float = 0.0, label_check=None):
    """{strategy: [(share, median labels, median acc, min acc, max acc)]}, baseline (acc0 median), full (acc100 median)."""
    mine = [c for c in cells if c["shift"] == shift and c.get("flip", 0) == flip and c.get("label_check") == label_check]
    before = [c for c in mine if c["strategy"] == "before"]
    full = [c for c in mine if c["budget_share"] == 1.0]
    out = {}
    for s in sorted({c["strategy"] for c in mine} - {"before", "all"}):
        pts = []
        for share in sorted({c["budget_share"] for c in mine if c["strategy"] == s}):
            cs = [c for c in mine if c["strategy"] == s and c["budget_share"] == share]
            accs = [c[metric] for c in cs if c[metric] is not None]
            if accs:
                pts.append((share, _median([c["labels_spent"] for c in cs]), _median(accs), min(accs), max(accs)))
        out[s] = pts
    acc0 = _median([c["production_accuracy"] for c in before])
    acc100 = _median([c[metric] for c in full])
    n100 = _median([c["labels_spent"] for c in full])
    return out, acc0, acc100, n100, mine


def labels_to_reach(pts, target, full_pt):
    """Labels along a median curve (linear between points; the 100% point closes it) where it first reaches target."""
    seq = [(0.0, None)] + [(n, a) for _, n, a, _, _ in pts]
    if full_pt[1] is not None:
        seq.append(full_pt)
    seq = [(n, a) for n, a in seq if a is not None]
    for (n0, a0), (n1, a1) in zip(seq, seq[1:]):
        if a0 >= target:
            return n0
        if a1 >= target:
            return n0 + (n1 - n0) * (target - a0) / (a1 - a0) if a1 != a0 else n1
    if seq and seq[0][1] >= target:
        return seq[0][0]
    return None


def render(cells: list[dict], md_path: Path, png_path: Path | None) -> str:
    lines = []
    shifts = [s for s in ("digits", "hymenoptera") if any(c["shift"] == s for c in cells)]
    combos = sorted({(c.get("flip", 0.0), c.get("label_check")) for c in cells if c["strategy"] != "before"},
                    key=lambda t: (t[0], str(t[1])))
    for shift in shifts:
        for flip, check in combos:
            for metric, what in (("production_accuracy", "production after the pass (what is served)"),
                                 ("challenger_accuracy", "challenger (trained on the labels, whatever the gate said)")):
                cur, acc0, acc100, n100, mine = curves(cells, shift, metric, flip, check)
                if not cur and acc100 is None:
                    continue
                seeds = sorted({c["seed"] for c in mine})
                run = [c for c in mine if c["strategy"] != "before"]
                if metric == "challenger_accuracy" and run and all(c["challenger_accuracy"] == c["production_accuracy"] for c in run):
                    lines.append(f"\n{shift}: every challenger was promoted, so its accuracy is the production column above.")
                    continue
                shares = sorted({p[0] for pts in cur.values() for p in pts if p[0] < 1.0})
                n_stream = _median([c["n_stream"] for c in mine])
                n_test = _median([c["n_test"] for c in mine])
                lines.append(f"\n#### {shift}: {what}; flip {flip:g}, label check {check or 'default'}\n")
                lines.append(f"Shifted-test accuracy, median over seeds {seeds} (stream {n_stream:.0f} predictions, "
                             f"shifted test {n_test:.0f} images). Before (budget 0, the champion): {_fmt(acc0)}; "
                             f"all labels (100%, {_fmt(n100, 0)} labels): {_fmt(acc100)}.\n")
                head = "| strategy | " + " | ".join(f"{s:.0%} ({_fmt(_median([c['labels_spent'] for c in mine if c['budget_share'] == s]), 0)} labels)"
                                                        for s in shares) + " | 100% | gain recovered at 10% (of medians) | promoted (cells) |"
                lines.append(head)
                lines.append("|" + "---|" * (len(shares) + 4))
                gains = {}
                for s, pts in cur.items():
                    by = {p[0]: p for p in pts}
                    row = [f"{_fmt(by[sh][2])} [{_fmt(by[sh][3])}–{_fmt(by[sh][4])}]" if sh in by else "–" for sh in shares]
                    a10 = by.get(0.1, (None, None, None))[2]
                    g = ((a10 - acc0) / (acc100 - acc0)) if None not in (a10, acc0, acc100) and acc100 != acc0 else None
                    gains[s] = g
                    prom = [c for c in mine if c["strategy"] == s]
                    per_seed = []
                    for sd in seeds:
                        def one(strategy, share):
                            return next((c[metric] if strategy != "before" else c["production_accuracy"] for c in mine
                                         if c["seed"] == sd and c["strategy"] == strategy and c["budget_share"] == share), None)
                        a0s, a10s, a100s = one("before", 0.0), one(s, 0.1), one("all", 1.0)
                        if None not in (a0s, a10s, a100s) and a100s != a0s:
                            per_seed.append((a10s - a0s) / (a100s - a0s))
                    ps = " ".join(f"{x:.2f}" for x in per_seed) or "–"
                    lines.append(f"| {s} | " + " | ".join(row) + f" | {_fmt(acc100)} | {_fmt(g, 2)} (per seed: {ps}) | "
                                 f"{sum(c['promoted'] for c in prom)}/{len(prom)} |")
                full_pts = [c for c in mine if c["budget_share"] == 1.0]
                if full_pts:
                    lines.append(f"| all labels (100%) | " + " | ".join("" for _ in shares) + f" | {_fmt(acc100)} | 1.00 | "
                                 f"{sum(c['promoted'] for c in full_pts)}/{len(full_pts)} |")
                # Random's labels to match the best strategy's 10% accuracy.
                at10 = {s: next((p for p in pts if p[0] == 0.1), None) for s, pts in cur.items()}
                best = max(((s, p) for s, p in at10.items() if p and s != "random"), key=lambda t: t[1][2], default=None)
                if best and "random" in cur:
                    need = labels_to_reach(cur["random"], best[1][2], (n100, acc100))
                    first = cur["random"][0][1] if cur["random"] else None
                    ratio = need / best[1][1] if need else None
                    where = ("never (not even with every label)" if need is None else
                             f"its first point already: <= {need:.0f} labels (<= {ratio:.1f}x)" if need == first else
                             f"~{need:.0f} labels ({ratio:.1f}x; linear between its median points)")
                    lines.append(f"\nBest non-random strategy at 10%: **{best[0]}** ({_fmt(best[1][2])} with {best[1][1]:.0f} labels). "
                                 f"Random sampling's median curve reaches that accuracy at {where}.")
                from service.settings import ServiceSettings

                default = ServiceSettings.model_fields["review_strategy"].default
                if default in gains:
                    lines.append(f"Default strategy ({default}) recovers {_fmt(gains[default], 2)} of the 100% gain at 10% "
                                 f"(target >= 0.90).")
                if flip > 0 or check:
                    fc = [c for c in mine if c["strategy"] != "before"]
                    pr = [c.get("flag_precision") for c in fc]
                    rc = [c.get("flag_recall") for c in fc]
                    lines.append(f"Label check flags: median precision {_fmt(_median(pr), 2)}, recall {_fmt(_median(rc), 2)} "
                                 f"against the flipped labels ({sum(len(c.get('flipped', [])) for c in fc)} flipped, "
                                 f"{sum(len(c.get('flagged', [])) for c in fc)} flagged over {len(fc)} cells).")
    secs = [c["seconds"] for c in cells if c["strategy"] != "before"]
    if secs:
        lines.append(f"\nSeconds per cell (copy + review + retrain + scoring): median {statistics.median(secs):.0f}, "
                     f"min {min(secs):.0f}, max {max(secs):.0f} over {len(secs)} cells.")
    text = "\n".join(lines) + "\n"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    if png_path is not None and shifts:
        plot(cells, shifts, png_path)
    return text


def plot(cells: list[dict], shifts: list[str], png_path: Path) -> None:
    """One column per shift; top row the production model after the pass (the gate's choice), bottom row
    the challenger (what the labels taught, promoted or not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"random": "tab:gray", "margin": "tab:blue", "entropy": "tab:orange", "novelty": "tab:green"}
    rows = (("production_accuracy", "production after the retrain pass"), ("challenger_accuracy", "challenger (promoted or not)"))
    fig, axes = plt.subplots(len(rows), len(shifts), figsize=(6 * len(shifts), 4 * len(rows)), squeeze=False)
    for r, (metric, what) in enumerate(rows):
        for ax, shift in zip(axes[r], shifts):
            cur, acc0, acc100, n100, mine = curves(cells, shift, metric)
            for s, pts in cur.items():
                pts = [p for p in pts if p[0] < 1.0]
                if not pts:
                    continue
                xs = [0] + [p[1] for p in pts]
                ys = [acc0] + [p[2] for p in pts]
                ax.plot(xs, ys, marker="o", label=s, color=colors.get(s))
                ax.fill_between([0] + [p[1] for p in pts], [acc0] + [p[3] for p in pts], [acc0] + [p[4] for p in pts],
                                color=colors.get(s), alpha=0.12)
            full = [c[metric] for c in mine if c["budget_share"] == 1.0 and c[metric] is not None]
            if full:
                ax.errorbar([n100], [acc100], yerr=[[acc100 - min(full)], [max(full) - acc100]], fmt="*", color="black",
                            markersize=12, label="100% of the stream")
                ax.axhline(acc100, color="black", lw=0.8, ls=":")
            if acc0 is not None:
                ax.axhline(acc0, color="tab:red", lw=1, ls="--", label="before (champion)")
            seeds = sorted({c["seed"] for c in mine})
            if n100:
                ax.set_xscale("symlog", linthresh=max(1.0, 0.1 * n100))  # the small budgets are where strategies differ
            ax.set_title(f"{shift}, seeds {seeds}: {what}", fontsize=9)
            ax.set_xlabel("labels spent (reviewer answers)")
            ax.set_ylabel("shifted-test accuracy (median, min-max band)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------------

def code_fingerprint() -> dict:
    """Which code this run measured: the git commit (when ROOT is a checkout) and a hash of the modules."""
    import subprocess

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    files = sorted(p for d in ("training/retrain", "exporters/prediction_log", "service") for p in (ROOT / d).glob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]
    marker = ROOT / "SNAPSHOT_OF"
    return {"root": str(ROOT), "git_head": head or None, "snapshot_of": marker.read_text().strip() if marker.is_file() else None,
            "modules_sha256": digest}


def _list(text: str, kind=str):
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shifts", default="digits,hymenoptera")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--strategies", default="random,margin,entropy,novelty")
    ap.add_argument("--budgets", default="0.05,0.1,0.2,1.0", help="shares of the shifted stream; 1.0 runs once per seed")
    ap.add_argument("--epochs", type=int, default=4, help="most retrain epochs (LoopSettings.epochs)")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "label_budget")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "label_budget.json")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "label_budget.png")
    ap.add_argument("--flip", default="0", help="shares of answers the reviewer gets wrong (comma list)")
    ap.add_argument("--label-check", default=None, help="LoopSettings.label_check values to compare (comma list)")
    ap.add_argument("--hymenoptera", type=Path, default=ROOT.parent / "shared" / "datasets" / "hymenoptera")
    ap.add_argument("--append", action="store_true", help="keep the cells already in --out and run only the cells it lacks")
    ap.add_argument("--report-only", action="store_true", help="only re-render the table and PNG from --out")
    args = ap.parse_args()
    md_path = args.out.with_suffix(".md")
    if args.report_only:
        print(render(json.loads(args.out.read_text())["cells"], md_path, args.png))
        return

    from rich.console import Console
    from training.retrain.settings import LoopSettings

    console = Console(quiet=True)
    shifts, seeds, strategies = _list(args.shifts), _list(args.seeds, int), _list(args.strategies)
    budgets, flips = _list(args.budgets, float), _list(args.flip, float)
    checks: list[str | None] = [None]
    if args.label_check:
        if "label_check" in LoopSettings.model_fields:
            checks = _list(args.label_check)
        else:
            log("LoopSettings has no label_check field yet: running without the label-check comparison")
    if "hymenoptera" in shifts and not (args.hymenoptera / "val").is_dir():
        raise SystemExit(f"hymenoptera dataset not found at {args.hymenoptera}; pass --hymenoptera PATH or drop it from --shifts")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    doc = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "camera_change": CAMERA, "lease_batch": LEASE_BATCH, "stream_share": STREAM_SHARE, "epochs": args.epochs, "cells": [],
           "setups": []}
    import training.retrain.job  # noqa: F401  (imported now, so the fingerprint below is the code that runs)
    import exporters.prediction_log.review_queue  # noqa: F401

    doc["code"] = code_fingerprint()
    field = LoopSettings.model_fields.get("label_check")
    doc["label_check_default"] = field.default if field is not None else "no label check in this version"
    doc["torch_threads"] = __import__("torch").get_num_threads()
    doc["commands"] = [doc["command"]]
    if args.append and args.out.is_file():
        old = json.loads(args.out.read_text())
        doc["cells"], doc["setups"] = old.get("cells", []), old.get("setups", [])
        doc["commands"] = old.get("commands", [old.get("command")]) + [doc["command"]]
        doc["started"] = old.get("started", doc["started"])

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
        tmp.replace(args.out)

    def key(c):
        return (c["shift"], c["seed"], c["strategy"], float(c["budget_share"]), float(c.get("flip", 0.0)), c.get("label_check"))

    done = {key(c) for c in doc["cells"]} if args.append else set()
    plan = [(s, b) for b in budgets if b < 1.0 for s in strategies] + ([("all", 1.0)] if 1.0 in budgets else [])
    for shift in shifts:
        for seed in seeds:
            todo = [(flip, check, strategy, share) for flip in flips for check in checks for strategy, share in plan
                    if (shift, seed, strategy, float(share), float(flip), check) not in done]
            if not todo:
                log(f"{shift} seed {seed}: every cell is in {args.out} already")
                continue
            ctx = setup(shift, seed, args.work_dir, args.hymenoptera, console)
            t = time.perf_counter()
            acc0 = ctx["acc0"] = score_version(ctx["registry_dir"], ctx["champion"], ctx["test"], ctx["session"] / "scored")
            doc["setups"].append({k: ctx[k] for k in ("shift", "seed", "champion", "n_stream", "stream_served_accuracy",
                                                      "setup_s", "train_s")} | {"n_test": len(ctx["test"])})
            for flip in flips:
                for check in checks:
                    if (shift, seed, "before", 0.0, float(flip), check) in done:
                        continue
                    doc["cells"].append({"shift": shift, "seed": seed, "strategy": "before", "budget_share": 0.0, "labels_spent": 0,
                                         "n_stream": ctx["n_stream"], "n_test": len(ctx["test"]), "flip": flip, "label_check": check,
                                         "production_accuracy": acc0, "challenger_accuracy": None, "promoted": False,
                                         "seconds": round(time.perf_counter() - t, 1)})
            log(f"{shift} seed {seed}: champion on the shifted test {acc0:.3f}")
            for flip, check, strategy, share in todo:
                # The 100% budget labels the whole stream: the order the queue hands it out does not matter.
                cell = run_cell(ctx, "random" if strategy == "all" else strategy, share, flip, check, args.epochs, console)
                cell["strategy"] = strategy
                doc["cells"].append(cell)
                save()
                log(f"{shift} seed {seed} {strategy:8s} {share:>5.0%} flip {flip:g} check {check or '-'}: "
                    f"{cell['labels_spent']} labels, production {_fmt(cell['production_accuracy'])} "
                    f"({cell['status']}), challenger {_fmt(cell['challenger_accuracy'])}, {cell['seconds']:.0f}s"
                    + (f", flags P {_fmt(cell.get('flag_precision'), 2)} R {_fmt(cell.get('flag_recall'), 2)}"
                       if flip > 0 or check else ""))
            save()
            print(render(doc["cells"], md_path, args.png), flush=True)
            shutil.rmtree(ctx["session"], ignore_errors=True)
    doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    save()
    print(render(doc["cells"], md_path, args.png))


if __name__ == "__main__":
    main()
