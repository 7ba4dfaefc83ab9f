"""k8s/ workloads in detail: the service Deployment against the real BentoML app, the retrain CronJob,
the torchrun Job, the CLI flags the manifests pass, and the optional components."""
from __future__ import annotations

import base64
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest


from tests.k8s_render import (
    GPU_TARGETS, K8S, RETRAIN_COMMAND, ROOT, TARGETS, TRAIN_IMAGE, TRAIN_UID, retrain_pod_spec, service_pod_spec, containers,
    dangling_config_refs, find, one, pod_template, render_dir, rendered, schema_violations,
)


# --- tests: the service ---------------------------------------------------------------------------

@functools.cache
def bentoml_routes() -> tuple[tuple[str, str, str], ...]:
    """(route type, path, name) of the ASGI app BentoML serves for CnnloopService, in matching order."""
    code = ("import json\nfrom service.service import CnnloopService\n"
            "app = CnnloopService.to_asgi()\n"
            "print(json.dumps([[type(r).__name__, getattr(r, 'path', ''), getattr(r, 'name', '') or '']"
            " for r in app.router.routes]))")
    with tempfile.TemporaryDirectory() as home:  # nothing may land in ~/bentoml
        env = {**os.environ, "BENTOML_HOME": home, "BENTOML_DO_NOT_TRACK": "True"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return tuple(tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1]))


def served_route_name(path: str) -> str | None:
    """The name of the route that answers `path`, or None when nothing before the catch-all does."""
    for kind, route_path, name in bentoml_routes():
        if kind == "Route" and route_path == path:
            return name
        if kind.endswith("Mount") and route_path in ("", "/"):
            return None  # service/http_app.py is mounted at '/': anything after it is shadowed
    return None


def test_deployment_probe_paths_are_the_services_health_routes():
    container = service_pod_spec(rendered("base"))["containers"][0]
    # BentoML names its health routes; readiness must be the one that asks __is_ready__.
    expected = {"readinessProbe": {"readyz"}, "livenessProbe": {"livez", "healthz"}, "startupProbe": {"livez", "healthz"}}
    for probe, names in expected.items():
        path = container[probe]["httpGet"]["path"]
        assert served_route_name(path) in names, f"{probe} {path} is not a {names} route: {bentoml_routes()}"


def test_prometheus_scrape_annotations_point_at_the_metrics_route_and_port():
    deployment = one(rendered("base"), "Deployment", "cnnloop")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    port = next(p for p in service_pod_spec(rendered("base"))["containers"][0]["ports"] if p["name"] == "http")
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert served_route_name(annotations["prometheus.io/path"]) == "metrics"


def test_service_listens_on_the_port_cnnloop_serve_uses():
    import typer

    from training.cli import app

    serve = typer.main.get_command(app).commands["serve"]
    default_port = next(p.default for p in serve.params if p.name == "port")
    container = service_pod_spec(rendered("base"))["containers"][0]
    args = container["args"]
    http = next(p for p in container["ports"] if p["name"] == "http")
    assert int(args[args.index("--port") + 1]) == http["containerPort"] == default_port
    service = one(rendered("base"), "Service", "cnnloop")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_service_pods_run_as_the_bento_images_user():
    from bentoml._internal.container.generate import BENTO_UID_GID

    assert service_pod_spec(rendered("base"))["securityContext"]["runAsUser"] == BENTO_UID_GID


def test_hpa_pdb_service_and_network_policy_select_the_deployments_pods():
    objs = rendered("base")
    deployment = one(objs, "Deployment", "cnnloop")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cnnloop"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    selectors = [one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                 one(objs, "Service", "cnnloop")["spec"]["selector"],
                 one(objs, "NetworkPolicy", "cnnloop")["spec"]["podSelector"]["matchLabels"]]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()


def test_deployment_leaves_the_replica_count_to_the_hpa():
    assert "replicas" not in one(rendered("base"), "Deployment", "cnnloop")["spec"]


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_is_covered_by_a_network_policy(target):
    objs = rendered(target)
    selectors = [p["spec"]["podSelector"]["matchLabels"] for p in find(objs, "NetworkPolicy")]
    for obj in objs:
        template = pod_template(obj)
        if template is not None:
            labels = template["metadata"]["labels"]
            assert any(s.items() <= labels.items() for s in selectors), f"{obj['kind']}/{obj['metadata']['name']}"


def test_service_network_policy_admits_only_port_3000_and_sends_only_dns_and_https():
    policy = one(rendered("base"), "NetworkPolicy", "cnnloop")
    ingress_ports = {(p["port"], p["protocol"]) for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert ingress_ports == {(3000, "TCP")}
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (443, "TCP")}
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_placeholder_secret_fails_closed_in_the_service_settings():
    from service.errors import ConfigError
    from service.settings import load_service_settings

    secret = one(rendered("base"), "Secret")
    env = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert all(v == "REPLACE-ME" for v in env.values()), env
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_service_settings(environ=env)


# --- tests: retrain CronJob and distributed training -----------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_retrain_cronjob_forbids_overlapping_runs(target):
    assert one(rendered(target), "CronJob", "cnnloop-retrain")["spec"]["concurrencyPolicy"] == "Forbid"


@pytest.mark.parametrize("target", TARGETS)
def test_retrain_cronjob_runs_one_json_retrain(target):
    container = retrain_pod_spec(rendered(target))["containers"][0]
    command = container["command"] + container.get("args", [])
    assert command[:len(RETRAIN_COMMAND)] == RETRAIN_COMMAND
    assert ("--device" in command) == (target in GPU_TARGETS)
    if target in GPU_TARGETS:
        assert command[command.index("--device") + 1] == "cuda"


def test_retrain_cronjob_bounds_its_runs_and_history():
    cron = one(rendered("base"), "CronJob", "cnnloop-retrain")["spec"]
    job = cron["jobTemplate"]["spec"]
    assert cron["startingDeadlineSeconds"] > 0
    assert cron["successfulJobsHistoryLimit"] > 0 and cron["failedJobsHistoryLimit"] > 0
    assert job["backoffLimit"] >= 0 and job["activeDeadlineSeconds"] > 0
    assert retrain_pod_spec(rendered("base"))["restartPolicy"] == "Never"


def test_retrain_runs_in_the_training_image_as_its_user():
    retrain = retrain_pod_spec(rendered("base"))
    assert retrain["containers"][0]["image"].startswith(TRAIN_IMAGE + ":")
    dockerfile = (K8S / "images" / "train.Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert users == [f"{TRAIN_UID}:{TRAIN_UID}"]
    assert retrain["securityContext"]["runAsUser"] == TRAIN_UID


@pytest.mark.parametrize("target", ["base", "cpu", "gpu"])
def test_distributed_training_job_is_opt_in(target):
    assert find(rendered(target), "Job") == []


def test_distributed_training_job_starts_cnnloop_train_under_torchrun():
    job = one(rendered("gpu-train"), "Job", "cnnloop-train")
    container = job["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container["command"] + container["args"])
    assert re.search(r"torchrun --standalone .*--nproc-per-node=gpu --no-python\s+\\?\s*cnnloop train ", script), script
    assert "cnnloop export /work/run" in script
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cnnloop"] == "training.cli:main"  # the executable --no-python starts


def cnnloop_options(subcommand: str) -> set[str]:
    """The option strings `cnnloop SUBCOMMAND` accepts, read from the Typer app itself."""
    import typer

    from training.cli import app

    command = typer.main.get_command(app).commands[subcommand]
    return {opt for param in command.params for opt in param.opts + param.secondary_opts if opt.startswith("-")}


def cnnloop_invocations(script: str) -> list[tuple[str, list[str]]]:
    """(subcommand, flags) of every `cnnloop SUB ...` in a shell script or argv string."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        for match in re.finditer(r"(?<![\w/-])cnnloop\s+(\w+)(.*)", line):
            found.append((match.group(1), re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", match.group(2))))
    return found


@pytest.mark.parametrize("target", TARGETS)
def test_every_cnnloop_flag_in_the_manifests_is_one_the_cli_accepts(target):
    invocations = []
    for _, c, _ in containers(rendered(target)):
        argv = c.get("command", []) + c.get("args", [])
        if argv[:1] == ["cnnloop"]:
            invocations.append((argv[1], [a for a in argv[2:] if a.startswith("--")]))
        else:
            invocations += cnnloop_invocations(" ".join(argv))
    subcommands = {sub for sub, _ in invocations}
    assert subcommands == ({"retrain", "train", "export"} if target == "gpu-train" else {"retrain"}), invocations
    for subcommand, flags in invocations:
        assert set(flags) <= cnnloop_options(subcommand), f"cnnloop {subcommand}: {set(flags) - cnnloop_options(subcommand)}"


# --- tests: components and private overlays ---------------------------------------------------------

def _overlay(tmp_path: Path, text: str) -> list[dict]:
    """Render a throwaway overlay in tmp_path; kustomize accepts only relative paths to other roots."""
    rel = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(text.replace("K8S", rel))
    return render_dir(tmp_path)


def test_servicemonitor_component_scrapes_the_service_metrics_port(tmp_path):
    objs = _overlay(tmp_path, "resources: [K8S/overlays/cpu]\ncomponents: [K8S/components/servicemonitor]\n")
    monitor = one(objs, "ServiceMonitor", "cnnloop")
    service = one(objs, "Service", "cnnloop")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert served_route_name(monitor["spec"]["endpoints"][0]["path"]) == "metrics"
    assert schema_violations(objs) == []


def test_a_private_overlay_replaces_the_placeholder_secret(tmp_path):
    (tmp_path / "secrets.env").write_text("CNNLOOP_API_TOKEN=" + "a" * 24 + "\nCNNLOOP_PREDICT_TOKEN=\n")
    objs = _overlay(tmp_path, "resources: [K8S/overlays/gpu]\nsecretGenerator:\n"
                              "  - {name: cnnloop-secrets, behavior: replace, envs: [secrets.env]}\n")
    secret = one(objs, "Secret")
    assert set(secret["data"]) == {"CNNLOOP_API_TOKEN", "CNNLOOP_PREDICT_TOKEN"}
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for _, c, _ in containers(objs)
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {secret["metadata"]["name"]}
    assert dangling_config_refs(objs) == []  # the AWS key refs are optional: IRSA needs none
