"""Rendering k8s/ with kubectl kustomize, and the deployment rules the manifest tests apply (each rule returns
its violations; BREAKERS says how to break each one, so the tests can show every rule still fails)."""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
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
    "cpu-tune": K8S / "overlays" / "cpu-tune",
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


def service_pod_spec(objs):
    return one(objs, "Deployment", "cnnloop")["spec"]["template"]["spec"]


def retrain_pod_spec(objs):
    return one(objs, "CronJob", "cnnloop-retrain")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


# How to break each rule, starting from the rendered base.
BREAKERS: dict[str, Callable[[list[dict]], None]] = {
    "schema": lambda objs: service_pod_spec(objs)["containers"][0].update(imagePullPolicyy="Always"),
    "probes": lambda objs: service_pod_spec(objs)["containers"][0].pop("readinessProbe"),
    "resources": lambda objs: retrain_pod_spec(objs)["containers"][0]["resources"].pop("limits"),
    "non-root": lambda objs: service_pod_spec(objs)["containers"][0].setdefault("securityContext", {}).update(runAsUser=0),
    "read-only root": lambda objs: retrain_pod_spec(objs)["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
    "no escalation": lambda objs: service_pod_spec(objs)["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
    "seccomp": lambda objs: retrain_pod_spec(objs)["securityContext"].pop("seccompProfile"),
    "pinned images": lambda objs: service_pod_spec(objs)["containers"][0].update(image=f"{SERVICE_IMAGE}:latest"),
    "settings from ConfigMap/Secret": lambda objs: service_pod_spec(objs)["containers"][0]["env"].append(
        {"name": "CNNLOOP_API_TOKEN", "value": "x" * 32}),
    "refs resolve": lambda objs: service_pod_spec(objs)["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"].update(key="NOPE"),
    "ConfigMap attached": lambda objs: retrain_pod_spec(objs)["containers"][0].pop("envFrom"),
    "writable paths mounted": lambda objs: service_pod_spec(objs)["containers"][0]["volumeMounts"].pop(),
    "no SA tokens": lambda objs: one(objs, "ServiceAccount", "cnnloop").pop("automountServiceAccountToken"),
}
