"""Training throughput: cnnloop's trainer vs the tutorial way, side by side in one run.

Baseline = the PyTorch transfer-learning tutorial's loop: torchvision ImageFolder decoding every
JPEG every epoch (RandomResizedCrop + flip + ToTensor + Normalize), full fine-tune with SGD,
a validation pass per epoch. Same model (EfficientNet-Lite0, offline ImageNet weights), same batch,
same epochs, same train/val images. Each contender runs in its own child process so peak RSS is
its own; rounds alternate the order to spread machine noise. Reported: images/s (train images x
epochs / wall time of the whole job, decoding included), ratio to the baseline, peak RSS.

    python bench/train_throughput.py [--data DIR] [--epochs 3] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera" / "train"


def _split_files(data: Path, seed: int = 0):
    """The same carved val split cnnloop uses, so both contenders train and validate on the same images."""
    from training.data.sources import discover
    from training.data.stratify import stratified_split

    src = discover(data).train
    keep, held = stratified_split(src.labels, 0.15, seed + 1)
    return src.subset(keep), src.subset(held)


class DecodeEveryTime:
    """torchvision ImageFolder semantics over the shared file list: PIL-decode on every access."""

    def __init__(self, files, tf):
        self.files, self.tf = files, tf

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from torchvision.datasets.folder import default_loader

        return self.tf(default_loader(str(self.files.paths[i]))), int(self.files.labels[i])


def run_baseline(data: Path, epochs: int, batch: int) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from training.model.backbones import get_backbone_spec
    from training.model.classifier import build_classifier

    torch.manual_seed(0)
    train_files, val_files = _split_files(data)
    norm = transforms.Normalize([0.5] * 3, [0.5] * 3)
    tf_train = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    tf_val = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])

    model, _ = build_classifier(get_backbone_spec("efficientnet_lite0"), 2)
    model.mean.fill_(0.0), model.std.fill_(1.0)  # the tutorial normalises in the transform instead
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    crit = torch.nn.CrossEntropyLoss()
    train_dl = DataLoader(DecodeEveryTime(train_files, tf_train), batch_size=batch, shuffle=True, num_workers=2)
    val_dl = DataLoader(DecodeEveryTime(val_files, tf_val), batch_size=batch, num_workers=2)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in train_dl:
            opt.zero_grad()
            loss = crit(model(norm(x)), y)
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_dl:
                correct += (model(norm(x)).argmax(1) == y).sum().item()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "train_images": len(train_files) * epochs, "val_accuracy": correct / len(val_files)}


def run_cnnloop(data: Path, epochs: int, batch: int, strategy: str) -> dict:
    from training.config import load_train_config
    from training.train import train

    # 224 px like the baseline: same model, same input size (our default recipe trains lite0 at 288).
    cfg = load_train_config(None, {"epochs": epochs, "batch_size": batch, "strategy": strategy, "test_fraction": 0.0,
                                   "patience": epochs, "image_size": 224})
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        metrics = train(data, Path(out) / "run", cfg, show_progress=False)
        seconds = time.perf_counter() - t0
    n_train = sum(metrics["class_counts"]["train"].values())
    return {"seconds": seconds, "train_images": n_train * epochs, "val_accuracy": metrics["val"]["accuracy"]}


def _child(name: str, args, queue) -> None:
    sys.path.insert(0, str(ROOT))
    if name == "baseline":
        res = run_baseline(args.data, args.epochs, args.batch)
    else:
        res = run_cnnloop(args.data, args.epochs, args.batch, "gradual" if name == "cnnloop (default recipe)" else "finetune")
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(res)


CONTENDERS = ("baseline", "cnnloop (default recipe)", "cnnloop (full fine-tune)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder to train on (default: hymenoptera/train)")
    ap.add_argument("--epochs", type=int, default=6, help="6 spans the default schedule: 2 head-only epochs, then 1..4 open blocks")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; the median is reported")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    results: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    for r in range(args.rounds):
        order = CONTENDERS if r % 2 == 0 else tuple(reversed(CONTENDERS))
        for name in order:
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(name, args, q))
            p.start()
            p.join()
            if p.exitcode != 0 or q.empty():
                sys.exit(f"{name} failed (exit code {p.exitcode}); see the traceback above")
            res = q.get()
            res["images_per_s"] = res["train_images"] / res["seconds"]
            results[name].append(res)
            print(f"round {r + 1} {name}: {res['images_per_s']:.2f} img/s, peak RSS {res['peak_rss_mb']:.0f} MB", file=sys.stderr)
    base = statistics.median(x["images_per_s"] for x in results["baseline"])
    rows = []
    for name in CONTENDERS:
        ips = statistics.median(x["images_per_s"] for x in results[name])
        rows.append({"contender": name, "images_per_s": ips, "ratio_vs_baseline": ips / base,
                     "peak_rss_mb": max(x["peak_rss_mb"] for x in results[name]),
                     "val_accuracy": statistics.median(x["val_accuracy"] for x in results[name])})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": str(args.data), "epochs": args.epochs, "batch": args.batch, "rounds": args.rounds,
                                    "rows": rows, "raw": results}, indent=2))
    print(f"\nTraining throughput, {args.data.name}, {args.epochs} epochs, batch {args.batch}, median of {args.rounds} rounds\n")
    print("| contender | images/s | ratio vs baseline | peak RSS (MB) | val accuracy |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['contender']} | {row['images_per_s']:.2f} | {row['ratio_vs_baseline']:.2f}x | {row['peak_rss_mb']:.0f} | {row['val_accuracy']:.3f} |")


if __name__ == "__main__":
    main()
