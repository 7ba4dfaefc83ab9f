"""Every command the README shows is an executable specification: run as printed, in a terminal.

Each command line is taken from README.md's ```bash blocks and run with `bash -c` in a
pseudo-terminal (so rich draws its progress bars, as for a person), in a workspace that holds the
paths the README names (`path/to/images`, `labels.csv`, `ant.jpg` ...), filled with scikit-learn's
real digits (digit 0 as `ants`, digit 1 as `bees`). Only two things differ from a person's shell:
the recipe is shrunk through the documented env vars (CNNLOOP_TRAIN_EPOCHS=1, 64 px), and the
port 3000, the placeholder version id and prediction id are replaced by real ones.

`test_every_readme_command_is_run_or_excused` fails when the README gains a command this module
neither runs (RUN) nor names a reason not to run (NOT_RUN); a command edited in the README fails
its test.
The tests run in file order and share one workspace: train -> export -> registry -> serve -> drift
-> retrain.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.readme_blocks import bash_lines, named_command, named_python, normal
from tests.terminal import Terminal, run_in_terminal
from training.demo.service_process import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VERSION_ID = re.compile(r"\bv\d{8}-\d{6}-[0-9a-f]{6}\b")
PROGRESS_BAR = "━"  # rich's BarColumn: present only when a bar was drawn
RUN_FILES = ("model.safetensors", "model.json", "classes.json", "config.yaml", "metrics.json", "curves.png",
             "confusion_val.png", "splits.json", "skipped_images.json")

# README commands this module does not run, and why. Everything else in a ```bash block is run.
NOT_RUN = {
    named_command("main"): "CI (.ci/run) runs it as printed, in a pseudo-terminal, and checks the loop closed",
    named_command("tests"): "the README's test command: CI runs it, and it runs this module",
    ".venv/bin/python -m pytest -q tests/test_k8s_manifests.py tests/test_bento_build.py": "part of the test command",
    "bentoml containerize cnnloop:latest -t ghcr.io/cnnloop/cnnloop-service:0.1.0": "needs a Docker engine",
    "bentoml containerize cnnloop-gpu:latest -t ghcr.io/cnnloop/cnnloop-service:0.1.0-gpu": "needs a Docker engine",
    "docker build -f k8s/images/train.Dockerfile -t ghcr.io/cnnloop/cnnloop-train:0.1.0 .": "needs a Docker engine",
    "docker build -f k8s/images/train.Dockerfile --build-arg VARIANT=gpu -t ghcr.io/cnnloop/cnnloop-train:0.1.0-gpu .":
        "needs a Docker engine",
    "docker push ghcr.io/cnnloop/cnnloop-service:0.1.0": "needs a Docker engine and a registry",
    "kubectl create namespace cnnloop": "needs a cluster",
    "kubectl apply -k deploy/prod -n cnnloop": "needs a cluster; the same overlay is rendered here",
    "kubectl -n cnnloop rollout status deploy/cnnloop": "needs a cluster",
    "kubectl -n cnnloop create job --from=cronjob/cnnloop-retrain retrain-now": "needs a cluster",
    "kubectl -n cnnloop logs -f job/retrain-now": "needs a cluster",
    "kubectl -n cnnloop patch cronjob cnnloop-retrain -p '{\"spec\":{\"suspend\":true}}'": "needs a cluster",
    "kubectl apply -k k8s/overlays/gpu-train -n cnnloop": "needs a cluster; the overlay is rendered here",
    "kubectl -n cnnloop logs -f job/cnnloop-train": "needs a cluster",
    "cnnloop registry promote VERSION": "the same command as `registry promote v20261124-...`, run here",
    "cnnloop lr-find path/to/images --apply recipe.yaml": "100 steps take a minute on a CPU; tests/test_lr_find.py "
        "runs lr-find with --apply on digits through the CLI",
    "cnnloop compare path/to/images --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2 --out compare/":
        "15 trainings and 3 exports (minutes); tests/test_compare.py runs compare on digits through the CLI",
    "cnnloop log import-s3 --data-dir s3://bucket/svc": "needs an S3 log of the pre-SQL layout and a database: "
        "tests/test_prediction_log.py runs it against a moto S3 server and a real PostgreSQL",
}
# README commands the tests below run (Workspace.line refuses any other).
RUN = (
    "cnnloop train path/to/images --out runs/mine",
    "cnnloop train path/to/dataset --out runs/mine",
    "cnnloop train labels.csv --out runs/mine",
    "cnnloop train path/to/train --test-dir path/to/holdout --out runs/mine",
    "cnnloop train path/to/images --out runs/accurate --backbone efficientnet_lite2 --strategy freeze",
    "cnnloop evaluate runs/mine path/to/folder --out eval/",
    "cnnloop cv path/to/images --folds 5 --json cv.json",
    "cnnloop tune path/to/images --trials 8 --timeout 1h --out tune/",
    "cnnloop train path/to/images --config tune/best_config.yaml --out runs/tuned",
    "export CNNLOOP_REGISTRY=./registry",
    "cnnloop export runs/mine --promote production",
    "cnnloop registry list",
    "cnnloop registry show production",
    "cnnloop registry promote v20261124-120501-3f2a9c",
    "cnnloop registry rollback",
    "cnnloop serve --port 3000",
    "curl -F images=@ant.jpg -F images=@bee.jpg localhost:3000/predict",
    "curl -H 'content-type: application/json' -d '{\"prediction_id\": \"...\", \"label\": \"bees\"}' localhost:3000/feedback",
    "curl localhost:3000/v2/models/cnnloop",
    "cnnloop drift --last 500 --png drift.png",
    "cnnloop log info",
    "cnnloop retrain",
    "cnnloop retrain --force",
    "cnnloop retrain --every 1h",
    "bentoml build",
    "bentoml build -f bentofile.gpu.yaml",
    "kubectl kustomize k8s/overlays/gpu",
    "kubectl kustomize deploy/prod | less",
)


NOT_RUN = {normal(k): v for k, v in NOT_RUN.items()}
RUN = frozenset(map(normal, RUN))


class Workspace:
    """A folder laid out as the README assumes, and the environment of one shell session in it."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CNNLOOP_")}
        self.env.update({
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TERM": "xterm-256color",
            "BENTOML_HOME": str(root / ".bentoml"), "BENTOML_DO_NOT_TRACK": "True",
            # The documented env vars shrink the recipe so every command takes seconds.
            "CNNLOOP_TRAIN_EPOCHS": "1", "CNNLOOP_TRAIN_IMAGE_SIZE": "64", "CNNLOOP_TRAIN_HFLIP": "false",
            "CNNLOOP_TRAIN_BATCH_SIZE": "16", "CNNLOOP_EPOCHS": "1",
        })
        self.port = free_port()
        self.versions: list[str] = []
        self.predictions: list[dict] = []
        self.service: Terminal | None = None

    def readme(self, command: str, substitute: dict[str, str] | None = None, timeout: float = 300,
               cwd: Path | None = None) -> str:
        """Run README command `command` (it must be in the README) to its end; exit 0 or fail. Returns its output."""
        line = self.line(command, substitute)
        code, out = run_in_terminal(line, cwd or self.root, self.env, timeout)
        assert code == 0, f"`{line}` exited {code}:\n{out[-5000:]}"
        return out

    def line(self, command: str, substitute: dict[str, str] | None = None) -> str:
        """The README's line for `command`, as printed (its comment too: bash drops it), substituted."""
        assert normal(command) in RUN, f"`{command}` is not listed in RUN"
        shown = bash_lines()
        assert normal(command) in shown, f"the README no longer shows `{command}`"
        command = shown[normal(command)]
        for old, new in (substitute or {}).items():
            assert old in command, f"`{old}` is not in `{command}`"
            command = command.replace(old, new)
        return command


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("readme"))
    digits = ws.root / "digits"
    code, out = run_in_terminal(f"cnnloop data digits --out {digits} --limit-per-class 40", ws.root, ws.env, 120)
    assert code == 0, out
    classes = {"ants": sorted((digits / "0").glob("*.png")), "bees": sorted((digits / "1").glob("*.png"))}
    manifest = ["path,label,split"]
    for name, files in classes.items():
        for i, f in enumerate(files[:36]):
            _copy(f, ws.root / "path/to/images" / name)
            split = "train" if i < 24 else ("val" if i < 30 else "test")
            _copy(f, ws.root / "path/to/dataset" / split / name)
            manifest.append(f"path/to/images/{name}/{f.name},{name},{split}")
            _copy(f, ws.root / ("path/to/train" if i < 30 else "path/to/holdout") / name)
            if i >= 24:
                _copy(f, ws.root / "path/to/folder" / name)
        Image.open(files[36]).convert("RGB").save(ws.root / f"{name[:-1]}.jpg", quality=95)
    (ws.root / "labels.csv").write_text("\n".join(manifest) + "\n")
    yield ws
    if ws.service is not None:
        ws.service.kill()


def _copy(src: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, folder / src.name)


def _assert_run_dir(run: Path, output: str, test_split: bool) -> dict:
    missing = [f for f in RUN_FILES if not (run / f).is_file()]
    assert not missing, f"{run} lacks {missing}"
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test") if test_split else ("val",):
        assert {"accuracy", "macro_f1"} <= set(metrics[split]), metrics.keys()
    if test_split:
        assert (run / "confusion_test.png").is_file()
    assert PROGRESS_BAR in output and "epoch 1/1" in output, f"no progress bar was drawn:\n{output[-3000:]}"
    return metrics


def _train(ws: Workspace, command: str, test_split: bool = True) -> dict:
    shutil.rmtree(ws.root / "runs/mine", ignore_errors=True)
    out = ws.readme(command)
    return _assert_run_dir(ws.root / "runs/mine", out, test_split)


def test_train_on_an_image_folder_carves_val_and_test(ws):
    metrics = _train(ws, "cnnloop train path/to/images --out runs/mine")
    assert sorted(metrics["carved_splits"]) == ["test", "val"]


def test_train_on_a_train_val_test_layout_carves_nothing(ws):
    metrics = _train(ws, "cnnloop train path/to/dataset --out runs/mine")
    assert metrics["carved_splits"] == []
    assert metrics["test"]["n"] == 12


def test_train_on_a_csv_manifest_uses_its_splits(ws):
    metrics = _train(ws, "cnnloop train labels.csv --out runs/mine")
    assert metrics["carved_splits"] == [] and metrics["test"]["n"] == 12


def test_train_with_a_test_dir_scores_that_folder(ws):
    metrics = _train(ws, "cnnloop train path/to/train --test-dir path/to/holdout --out runs/mine")
    assert metrics["test"]["n"] == 12 and metrics["carved_splits"] == ["val"]


def test_accurate_recipe_trains_lite2_with_a_frozen_backbone(ws):
    out = ws.readme("cnnloop train path/to/images --out runs/accurate --backbone efficientnet_lite2 --strategy freeze")
    _assert_run_dir(ws.root / "runs/accurate", out, test_split=True)
    assert json.loads((ws.root / "runs/accurate/model.json").read_text())["backbone"]["name"] == "efficientnet_lite2"


def test_evaluate_writes_scores_and_confusion_matrix(ws):
    ws.readme("cnnloop evaluate runs/mine path/to/folder --out eval/")
    scores = json.loads((ws.root / "eval/scores.json").read_text())
    assert scores["n"] == 24 and 0 <= scores["accuracy"] <= 1
    assert (ws.root / "eval/confusion.png").is_file()


def test_cv_writes_mean_and_std_over_five_folds(ws):
    out = ws.readme("cnnloop cv path/to/images --folds 5 --json cv.json")
    cv = json.loads((ws.root / "cv.json").read_text())
    assert len(cv["folds"]) == 5 and {"mean", "std"} <= set(cv["summary"]["accuracy"])
    assert len(cv["linear_probe"]["folds"]) == 5 and isinstance(cv["beats_linear_probe"], bool)
    assert "linear probe" in out
    assert PROGRESS_BAR in out


def test_tune_searches_and_its_best_config_trains(ws):
    out = ws.readme("cnnloop tune path/to/images --trials 8 --timeout 1h --out tune/")
    summary = json.loads((ws.root / "tune/summary.json").read_text())
    assert summary["counted_trials"] == 8 and summary["best"] is not None
    assert summary["fixed"] == {} and "image_size" not in summary["space"]  # the env's 64 px is fixed, not searched
    assert "linear probe" in out and "best config" in out
    assert PROGRESS_BAR in out
    for name in ("best_config.yaml", "trials.json", "optimization_history.png", "param_importances.png"):
        assert (ws.root / "tune" / name).is_file(), name
    ws.readme("cnnloop train path/to/images --config tune/best_config.yaml --out runs/tuned")
    assert (ws.root / "runs/tuned/metrics.json").is_file()


def test_export_prints_the_new_version_and_promotes_it(ws):
    ws.readme("export CNNLOOP_REGISTRY=./registry")
    ws.env["CNNLOOP_REGISTRY"] = "./registry"  # `export` in the README's shell session lasts for what follows
    for _ in range(2):  # two versions, so promote and rollback below have somewhere to go
        out = ws.readme("cnnloop export runs/mine --promote production")
        ws.versions.append(VERSION_ID.findall(out)[-1])
    assert len(set(ws.versions)) == 2 and (ws.root / "registry").is_dir()


def test_registry_list_shows_both_versions(ws):
    out = ws.readme("cnnloop registry list")
    assert all(v in out for v in ws.versions) and "production" in out


def test_registry_show_prints_files_with_checksums(ws):
    out = ws.readme("cnnloop registry show production")
    assert ws.versions[1] in out and re.search(r"sha256 [0-9a-f]{64}", out)


def test_registry_promote_then_rollback_moves_production_and_back(ws):
    out = ws.readme("cnnloop registry promote v20261124-120501-3f2a9c", {"v20261124-120501-3f2a9c": ws.versions[0]})
    assert f"{ws.versions[1]} -> {ws.versions[0]}" in out
    out = ws.readme("cnnloop registry rollback")
    assert f"{ws.versions[0]} -> {ws.versions[1]}" in out


def test_serve_answers_the_two_curl_calls(ws):
    ws.service = Terminal(ws.line("cnnloop serve --port 3000", {"3000": str(ws.port)}), ws.root, ws.env)
    wait_until_ready(f"http://127.0.0.1:{ws.port}", ws.service.process, 180, lambda: ws.service.output)
    out = ws.readme("curl -F images=@ant.jpg -F images=@bee.jpg localhost:3000/predict", {"3000": str(ws.port)})
    answer = json.loads(out[out.index("{"):])
    assert [p["filename"] for p in answer["predictions"]] == ["ant.jpg", "bee.jpg"]
    assert answer["model_version"] == ws.versions[1]
    ws.predictions = answer["predictions"]
    first = ws.predictions[0]["prediction_id"]
    out = ws.readme("curl -H 'content-type: application/json' -d '{\"prediction_id\": \"...\", \"label\": \"bees\"}' "
                    "localhost:3000/feedback", {"3000": str(ws.port), '"..."': json.dumps(first)})
    ack = json.loads(out[out.index("{"):])
    assert ack["prediction_id"] == first and ack["label"] == "bees"


def test_oip_metadata_curl_and_the_tritonclient_snippet_answer_like_predict(ws):
    port = {"3000": str(ws.port)}
    out = ws.readme("curl localhost:3000/v2/models/cnnloop", port)
    metadata = json.loads(out[out.index("{"):])
    assert metadata["name"] == "cnnloop" and metadata["versions"] == [ws.versions[1]]
    snippet = named_python("tritonclient")
    assert '"localhost:3000"' in snippet
    script = ws.root / "readme_tritonclient.py"
    script.write_text(snippet.replace('"localhost:3000"', f'"localhost:{ws.port}"'))
    code, out = run_in_terminal(f"{sys.executable} {script}", ws.root, ws.env, 120)
    assert code == 0, out
    labels = [p["label"] for p in ws.predictions]
    assert all(repr(label.encode()) in out for label in labels), (labels, out)


def test_drift_reports_on_the_served_traffic_and_draws_it(ws):
    # A real client sends the window a verdict needs (min_samples 100) through the running service.
    images = sorted((ws.root / "path/to/images").rglob("*.png"))
    with httpx.Client(base_url=f"http://127.0.0.1:{ws.port}", timeout=60) as client:
        for i in range(0, 120, 12):
            batch = [images[j % len(images)] for j in range(i, i + 12)]
            r = client.post("/predict", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in batch])
            assert r.status_code == 200, r.text
    out = ws.readme("cnnloop drift --last 500 --png drift.png")
    assert (ws.root / "drift.png").stat().st_size > 0
    assert re.search(r"drift", out, re.I) and "insufficient data" not in out.lower()


def test_log_info_shows_the_served_traffic(ws):
    out = ws.readme("cnnloop log info")
    assert re.search(r"schema version: \d", out), out[-2000:]
    predictions = int(re.search(r"predictions: (\d+)", out).group(1))
    assert predictions >= 12, out[-2000:]  # what the drift test above sent, committed by the service's log writer


def test_retrain_pass_decides_and_exits_zero(ws):
    out = ws.readme("cnnloop retrain")
    assert re.search(r"\b(skipped|promoted|kept_champion): production = v", out), out[-2000:]
    assert list((ws.root / "data/service/audit").glob("decisions-*.jsonl"))


def test_retrain_force_trains_a_challenger_with_progress_bars(ws):
    out = ws.readme("cnnloop retrain --force")
    assert PROGRESS_BAR in out and "epoch 1/1" in out, out[-3000:]
    assert re.search(r"\b(promoted|kept_champion): production = v", out), out[-2000:]


def test_retrain_every_runs_a_pass_then_stops_on_ctrl_c(ws):
    term = Terminal(ws.line("cnnloop retrain --every 1h"), ws.root, ws.env)
    try:
        term.read_until(r"production = ", timeout=300)
        term.interrupt()
        code, out = term.wait(60)
    finally:
        term.kill()
    assert code == 0 and "stopped" in out, out[-2000:]


def test_bentoml_build_builds_both_bentofiles(ws):
    for command in ("bentoml build", "bentoml build -f bentofile.gpu.yaml"):
        out = ws.readme(command, cwd=ROOT, timeout=300)
        assert re.search(r"cnnloop(-gpu)?:\w+", out), out[-2000:]


def test_kubectl_kustomize_renders_every_overlay(ws):
    ws.readme("kubectl kustomize k8s/overlays/gpu", cwd=ROOT, timeout=120)
    for overlay in sorted((ROOT / "k8s/overlays").iterdir()):
        code, out = run_in_terminal(f"kubectl kustomize k8s/overlays/{overlay.name}", ROOT, ws.env, 120)
        assert code == 0 and "kind: Deployment" in out, out[-2000:]


def test_the_readme_production_overlay_renders(ws):
    """deploy/prod of the README (its kustomization.yaml and secrets.env, as printed) on top of k8s/."""
    text = (ROOT / "README.md").read_text()
    kustomization = re.search(r"```yaml\n# deploy/prod/kustomization.yaml\n(.*?)```", text, re.S).group(1)
    secrets = re.search(r"```dotenv\n# deploy/prod/secrets.env\n(.*?)```", text, re.S).group(1)
    site = ws.root / "site"
    (site / "deploy/prod").mkdir(parents=True)
    (site / "k8s").symlink_to(ROOT / "k8s")
    (site / "deploy/prod/kustomization.yaml").write_text(kustomization)
    (site / "deploy/prod/secrets.env").write_text(re.sub(r"\s+#.*", "", secrets))
    # The pager would wait for a key in a terminal; what it pages is the command's output.
    out = ws.readme("kubectl kustomize deploy/prod | less", {" | less": ""}, cwd=site, timeout=120)
    assert "CNNLOOP_REGISTRY: s3://acme-ml/cnnloop/registry" in out and "nvidia.com/gpu" in out


def test_every_readme_command_is_run_or_excused():
    shown = set(bash_lines())
    unaccounted = sorted(shown - RUN - set(NOT_RUN))
    assert not unaccounted, f"README commands no test runs (add a test, or a reason to NOT_RUN): {unaccounted}"
    stale = sorted((RUN | set(NOT_RUN)) - shown)
    assert not stale, f"commands listed here that the README no longer shows: {stale}"


def test_the_readme_says_how_many_of_its_commands_are_run_and_excused():
    shown = set(bash_lines()) - {normal(named_command("main")), normal(named_command("tests"))}
    said = re.search(r"Of the other (\d+) command lines .*? runs (\d+) as printed .*? lists the other (\d+) in its `NOT_RUN`",
                     " ".join((ROOT / "README.md").read_text().split()))
    assert said, "README.md no longer says how many of its commands tests/test_readme_commands.py runs"
    assert tuple(map(int, said.groups())) == (len(shown), len(shown & RUN), len(shown & set(NOT_RUN)))
