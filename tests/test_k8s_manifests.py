"""k8s/: every kustomize target renders, every object passes the Kubernetes 1.32 OpenAPI schema in
strict mode (unknown fields fail), and the deployment rules hold, one test per rule.

Each rule is a function returning its violations; `test_rule_flags_a_broken_object` feeds every
rule a deliberately broken copy of a rendered object, so a rule that can no longer fail is caught.
kubectl (with its built-in kustomize) is required: without it these tests fail, never skip.
"""
from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
TARGETS = {
    "base": K8S / "base",
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "gpu-train": K8S / "overlays" / "gpu-train",
}
GPU_TARGETS = ("gpu", "gpu-train")
KUBERNETES_VERSION = "1.32.0"
# Custom resources have no schema in kubernetes-validate; they get the structural checks below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
SERVICE_IMAGE = "ghcr.io/cnnloop/cnnloop-service"
TRAIN_IMAGE = "ghcr.io/cnnloop/cnnloop-train"
TRAIN_UID = 10001  # k8s/images/train.Dockerfile
RETRAIN_COMMAND = ["cnnloop", "retrain", "--json", "-"]


# --- rendering -----------------------------------------------------------------------------------

def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is required to render k8s/ (its built-in kustomize); install kubectl >= 1.27 "
                    "(CI installs it). These tests fail instead of skipping so a missing tool is never green.")
    return path


def render_dir(path: Path) -> list[dict]:
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"`kubectl kustomize {path}` failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def _render_cached(target: str) -> str:
    return json.dumps(render_dir(TARGETS[target]))


def rendered(target: str) -> list[dict]:
    """A fresh copy of a target's objects (rendered once per session)."""
    return json.loads(_render_cached(target))


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_template(obj: dict) -> dict | None:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    if obj["kind"] in WORKLOAD_KINDS:
        return obj["spec"]["template"]
    return None


def containers(objects: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    """(where, container, pod spec) for every container and init container of every workload."""
    for obj in objects:
        template = pod_template(obj)
        if template is None:
            continue
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield f"{obj['kind']}/{obj['metadata']['name']}:{c['name']}", c, spec


def effective(container: dict, pod_spec: dict, field: str):
    """A securityContext field as the kubelet sees it: the container's, else the pod's."""
    value = container.get("securityContext", {}).get(field)
    return pod_spec.get("securityContext", {}).get(field) if value is None else value


def service_containers(objects: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    for where, c, spec in containers(find(objects, "Deployment")):
        if c["image"].split(":")[0].split("@")[0] == SERVICE_IMAGE:
            yield where, c, spec


# --- rules: each returns what breaks it ----------------------------------------------------------

def schema_violations(objects: list[dict]) -> list[str]:
    import kubernetes_validate

    errors = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{where}: {e.message}")
    return errors


def missing_probes(objects: list[dict]) -> list[str]:
    return [f"{where} lacks {probe}" for where, c, _ in service_containers(objects)
            for probe in ("readinessProbe", "livenessProbe") if probe not in c]


def missing_resources(objects: list[dict]) -> list[str]:
    return [f"{where} lacks resources.{kind}.{res}" for where, c, _ in containers(objects)
            for kind in ("requests", "limits") for res in ("cpu", "memory")
            if res not in c.get("resources", {}).get(kind, {})]


def root_containers(objects: list[dict]) -> list[str]:
    return [where for where, c, spec in containers(objects)
            if effective(c, spec, "runAsNonRoot") is not True or effective(c, spec, "runAsUser") in (0, None)]


def writable_root_filesystems(objects: list[dict]) -> list[str]:
    return [where for where, c, _ in containers(objects)
            if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True]


def escalating_containers(objects: list[dict]) -> list[str]:
    return [where for where, c, _ in containers(objects)
            if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False
            or c.get("securityContext", {}).get("capabilities", {}).get("drop") != ["ALL"]]


def unconfined_seccomp(objects: list[dict]) -> list[str]:
    return [where for where, c, spec in containers(objects)
            if (effective(c, spec, "seccompProfile") or {}).get("type") != "RuntimeDefault"]


def unpinned_images(objects: list[dict]) -> list[str]:
    bad = []
    for where, c, _ in containers(objects):
        image = c["image"]
        if "@sha256:" in image:
            continue
        last = image.rsplit("/", 1)[-1]
        if ":" not in last or last.rsplit(":", 1)[1] in ("", "latest"):
            bad.append(f"{where}: {image}")
    return bad


def gpu_requesters(objects: list[dict]) -> list[str]:
    return [where for where, c, _ in containers(objects)
            if any("nvidia.com/gpu" in c.get("resources", {}).get(k, {}) for k in ("requests", "limits"))]


def literal_settings(objects: list[dict]) -> list[str]:
    """CNNLOOP_* and AWS_* env vars written as literal values instead of coming from the ConfigMap/Secret."""
    return [f"{where}: {e['name']}" for where, c, _ in containers(objects) for e in c.get("env", [])
            if e["name"].startswith(("CNNLOOP_", "AWS_")) and "value" in e]


def dangling_config_refs(objects: list[dict]) -> list[str]:
    """envFrom/valueFrom references to ConfigMaps, Secrets or keys the render does not contain
    (a ref marked optional may miss its key: the AWS keys are absent under IRSA)."""
    data = {(o["kind"], o["metadata"]["name"]): set(o.get("data", {})) | set(o.get("stringData", {}))
            for o in objects if o["kind"] in ("ConfigMap", "Secret")}
    bad = []
    for where, c, _ in containers(objects):
        for src in c.get("envFrom", []):
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in src and (kind, src[key]["name"]) not in data:
                    bad.append(f"{where}: envFrom {kind} {src[key]['name']} is not rendered")
        for e in c.get("env", []):
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                ref = e.get("valueFrom", {}).get(key)
                if ref and not ref.get("optional") and ref["key"] not in data.get((kind, ref["name"]), set()):
                    bad.append(f"{where}: {e['name']} needs {kind} {ref['name']} key {ref['key']}, not rendered")
    return bad


def config_from_configmap_missing(objects: list[dict]) -> list[str]:
    """Containers that get no settings from a ConfigMap (so fall back to laptop defaults)."""
    return [where for where, c, _ in containers(objects)
            if not any("configMapRef" in src for src in c.get("envFrom", []))]


def unmounted_writable_paths(objects: list[dict]) -> list[str]:
    """Paths a container must write (/tmp, the CNNLOOP_* dirs it is given) that no volume backs."""
    config = {k: v for cm in find(objects, "ConfigMap") for k, v in cm.get("data", {}).items()}
    bad = []
    for where, c, _ in containers(objects):
        mounts = [Path(m["mountPath"]) for m in c.get("volumeMounts", []) if not m.get("readOnly")]
        needed = [Path("/tmp")]
        if c["image"].startswith(SERVICE_IMAGE):
            needed.append(Path(config["CNNLOOP_BUNDLE_CACHE_DIR"]))
        else:
            needed.append(Path(config["CNNLOOP_WORK_DIR"]))
        for path in needed:
            if not any(path == m or m in path.parents for m in mounts):
                bad.append(f"{where}: {path} is on the read-only root filesystem")
    return bad


def mounted_service_account_tokens(objects: list[dict]) -> list[str]:
    bad = [f"ServiceAccount/{o['metadata']['name']}" for o in find(objects, "ServiceAccount")
           if o.get("automountServiceAccountToken") is not False]
    for obj in objects:
        template = pod_template(obj)
        if template is not None and template["spec"].get("automountServiceAccountToken") is not False:
            bad.append(f"{obj['kind']}/{obj['metadata']['name']}")
    return bad


RULES: dict[str, Callable[[list[dict]], list[str]]] = {
    "schema": schema_violations,
    "probes": missing_probes,
    "resources": missing_resources,
    "non-root": root_containers,
    "read-only root": writable_root_filesystems,
    "no escalation": escalating_containers,
    "seccomp": unconfined_seccomp,
    "pinned images": unpinned_images,
    "settings from ConfigMap/Secret": literal_settings,
    "refs resolve": dangling_config_refs,
    "ConfigMap attached": config_from_configmap_missing,
    "writable paths mounted": unmounted_writable_paths,
    "no SA tokens": mounted_service_account_tokens,
}


def _service(objs):
    return one(objs, "Deployment", "cnnloop")["spec"]["template"]["spec"]


def _retrain(objs):
    return one(objs, "CronJob", "cnnloop-retrain")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


# How to break each rule, starting from the rendered base.
BREAKERS: dict[str, Callable[[list[dict]], None]] = {
    "schema": lambda objs: _service(objs)["containers"][0].update(imagePullPolicyy="Always"),
    "probes": lambda objs: _service(objs)["containers"][0].pop("readinessProbe"),
    "resources": lambda objs: _retrain(objs)["containers"][0]["resources"].pop("limits"),
    "non-root": lambda objs: _service(objs)["containers"][0].setdefault("securityContext", {}).update(runAsUser=0),
    "read-only root": lambda objs: _retrain(objs)["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
    "no escalation": lambda objs: _service(objs)["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
    "seccomp": lambda objs: _retrain(objs)["securityContext"].pop("seccompProfile"),
    "pinned images": lambda objs: _service(objs)["containers"][0].update(image=f"{SERVICE_IMAGE}:latest"),
    "settings from ConfigMap/Secret": lambda objs: _service(objs)["containers"][0]["env"].append(
        {"name": "CNNLOOP_API_TOKEN", "value": "x" * 32}),
    "refs resolve": lambda objs: _service(objs)["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"].update(key="NOPE"),
    "ConfigMap attached": lambda objs: _retrain(objs)["containers"][0].pop("envFrom"),
    "writable paths mounted": lambda objs: _service(objs)["containers"][0]["volumeMounts"].pop(),
    "no SA tokens": lambda objs: one(objs, "ServiceAccount", "cnnloop").pop("automountServiceAccountToken"),
}


# --- tests: rendering and schema -----------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_target_renders_with_kubectl_kustomize(target):
    kinds = {o["kind"] for o in rendered(target)}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "ServiceAccount", "ConfigMap", "Secret", "CronJob"} <= kinds


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_passes_the_kubernetes_schema_in_strict_mode(target):
    assert schema_violations(rendered(target)) == []


def test_schema_validation_rejects_an_unknown_field_and_a_wrong_type():
    objs = rendered("base")
    BREAKERS["schema"](objs)
    _retrain(objs)["containers"][0]["resources"]["limits"]["cpu"] = {"not": "a quantity"}
    errors = schema_violations(objs)
    assert any("imagePullPolicyy" in e for e in errors), errors
    assert any("limits.cpu" in e for e in errors), errors


@pytest.mark.parametrize("rule", RULES)
def test_rule_flags_a_broken_object(rule):
    objs = rendered("base")
    assert RULES[rule](objs) == [], f"the rendered base already breaks '{rule}'"
    BREAKERS[rule](objs)
    assert RULES[rule](objs), f"rule '{rule}' did not notice its own breakage"


# --- tests: one rule each, on every target --------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_service_containers_have_readiness_and_liveness_probes(target):
    assert list(service_containers(rendered(target))), "no service container found"
    assert missing_probes(rendered(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_cpu_and_memory_requests_and_limits(target):
    assert missing_resources(rendered(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_runs_as_non_root(target):
    assert root_containers(rendered(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_a_read_only_root_filesystem(target):
    assert writable_root_filesystems(rendered(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_no_container_can_escalate_or_keeps_capabilities(target):
    assert escalating_containers(rendered(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_uses_the_runtime_default_seccomp_profile(target):
    assert unconfined_seccomp(rendered(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_no_image_is_untagged_or_latest(target):
    assert unpinned_images(rendered(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_settings_come_from_the_configmap_and_secret_not_literals(target):
    assert literal_settings(rendered(target)) == []
    assert config_from_configmap_missing(rendered(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_configmap_and_secret_references_resolve(target):
    assert dangling_config_refs(rendered(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_paths_the_containers_write_are_mounted_volumes(target):
    assert unmounted_writable_paths(rendered(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_no_pod_mounts_a_service_account_token(target):
    assert mounted_service_account_tokens(rendered(target)) == []


# --- tests: GPU -----------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [t for t in TARGETS if t not in GPU_TARGETS])
def test_cpu_targets_request_no_gpu(target):
    assert gpu_requesters(rendered(target)) == []
    assert "nvidia.com/gpu" not in json.dumps(rendered(target))


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_gpu_targets_give_the_service_and_the_retrain_a_gpu(target):
    requesters = gpu_requesters(rendered(target))
    assert "Deployment/cnnloop:service" in requesters
    assert "CronJob/cnnloop-retrain:retrain" in requesters


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_gpu_pods_tolerate_the_gpu_taint_and_select_gpu_nodes(target):
    objs = rendered(target)
    for where, c, spec in containers(objs):
        if where in gpu_requesters(objs):
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec.get("tolerations", []), where
            assert spec.get("nodeSelector", {}).get("nvidia.com/gpu.present") == "true", where


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_gpu_targets_run_the_gpu_images(target):
    images = {c["image"] for _, c, _ in containers(rendered(target))}
    assert images and all(image.endswith("-gpu") for image in images), images


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
    container = _service(rendered("base"))["containers"][0]
    # BentoML names its health routes; readiness must be the one that asks __is_ready__.
    expected = {"readinessProbe": {"readyz"}, "livenessProbe": {"livez", "healthz"}, "startupProbe": {"livez", "healthz"}}
    for probe, names in expected.items():
        path = container[probe]["httpGet"]["path"]
        assert served_route_name(path) in names, f"{probe} {path} is not a {names} route: {bentoml_routes()}"


def test_prometheus_scrape_annotations_point_at_the_metrics_route_and_port():
    deployment = one(rendered("base"), "Deployment", "cnnloop")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    port = next(p for p in _service(rendered("base"))["containers"][0]["ports"] if p["name"] == "http")
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert served_route_name(annotations["prometheus.io/path"]) == "metrics"


def test_service_listens_on_the_port_cnnloop_serve_uses():
    import typer

    from training.cli import app

    serve = typer.main.get_command(app).commands["serve"]
    default_port = next(p.default for p in serve.params if p.name == "port")
    container = _service(rendered("base"))["containers"][0]
    args = container["args"]
    http = next(p for p in container["ports"] if p["name"] == "http")
    assert int(args[args.index("--port") + 1]) == http["containerPort"] == default_port
    service = one(rendered("base"), "Service", "cnnloop")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_service_pods_run_as_the_bento_images_user():
    from bentoml._internal.container.generate import BENTO_UID_GID

    assert _service(rendered("base"))["securityContext"]["runAsUser"] == BENTO_UID_GID


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
    container = _retrain(rendered(target))["containers"][0]
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
    assert _retrain(rendered("base"))["restartPolicy"] == "Never"


def test_retrain_runs_in_the_training_image_as_its_user():
    retrain = _retrain(rendered("base"))
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
