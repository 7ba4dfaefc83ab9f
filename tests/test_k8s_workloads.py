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
    GPU_TARGETS, K8S, RETRAIN_COMMAND, ROOT, RULES, TARGETS, TRAIN_IMAGE, TRAIN_UID, retrain_pod_spec, service_pod_spec,
    containers, dangling_config_refs, find, one, pod_template, render_dir, rendered, schema_violations,
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


def test_service_network_policy_admits_only_port_3000_and_sends_only_dns_https_and_postgres():
    policy = one(rendered("base"), "NetworkPolicy", "cnnloop")
    ingress_ports = {(p["port"], p["protocol"]) for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert ingress_ports == {(3000, "TCP")}
    # 5432: the log's PostgreSQL (CNNLOOP_LOG_URL), managed and outside the cluster or the postgres component
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (443, "TCP"), (5432, "TCP")}
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_placeholder_secret_fails_closed_in_the_service_settings():
    from service.errors import ConfigError
    from service.settings import load_service_settings

    secret = one(rendered("base"), "Secret")
    env = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert all("REPLACE-ME" in v for v in env.values()), env
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

    commands = typer.main.get_command(app).commands
    assert subcommand in commands, f"the manifests run `cnnloop {subcommand}`, which the CLI does not have"
    command = commands[subcommand]
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
    expected = {"gpu-train": {"retrain", "train", "export"}, "cpu-tune": {"retrain", "tune"}}.get(target, {"retrain"})
    assert subcommands == expected, invocations
    for subcommand, flags in invocations:
        assert set(flags) <= cnnloop_options(subcommand), f"cnnloop {subcommand}: {set(flags) - cnnloop_options(subcommand)}"


# --- tests: the tuning component (Optuna workers sharing one study) ----------------------------------

def _tune_job(objs: list[dict]) -> tuple[dict, dict]:
    job = one(objs, "Job", "cnnloop-tune")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return job, container


def _tune_argv(container: dict) -> list[str]:
    """The one `cnnloop tune ...` of the worker's script, as argv."""
    script = " ".join(container["command"] + container["args"]).replace("\\\n", " ")
    (line,) = [m.group(0) for m in re.finditer(r"(?<![\w/-])cnnloop\s+tune\b[^\n]*", script)]
    return line.split()


def _flag(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, (flag, argv)
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "cpu-tune"])
def test_tuning_job_is_opt_in(target):
    assert find(rendered(target), "Job", "cnnloop-tune") == []


def test_tune_job_is_indexed_with_one_worker_per_completion():
    job, _ = _tune_job(rendered("cpu-tune"))
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 1
    retries = spec.get("backoffLimitPerIndex", spec.get("backoffLimit"))
    assert retries is not None and 0 <= retries <= 5, "a worker that keeps failing must not retry forever"
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    # bad input is the same for every worker: the whole Job stops
    fail_job = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert any(2 in r["onExitCodes"]["values"] and 3 not in r["onExitCodes"]["values"] for r in fail_job)


def test_every_tune_worker_shares_one_budget_and_study_but_has_its_own_out():
    job, container = _tune_job(rendered("cpu-tune"))
    argv = _tune_argv(container)
    assert argv[:3] == ["cnnloop", "tune", "/data/train"] and "--quiet" in argv
    trials, study, out = _flag(argv, "--trials"), _flag(argv, "--study"), _flag(argv, "--out")
    # One pod template for all indexes, and nothing index-dependent in the shared settings: every
    # worker counts toward the same total in the same study.
    for value in (trials, study):
        assert "$" not in value and "JOB_COMPLETION_INDEX" not in value, value
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", study), study
    assert int(trials) >= job["spec"]["parallelism"], "fewer trials than workers leaves workers idle"
    assert "$(JOB_COMPLETION_INDEX)" in out, out
    writable = [Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")]
    assert any(m in Path(out).parents for m in writable), f"--out {out} is not on a writable volume"
    # the study's storage (with its password) never appears in the pod spec
    assert "--storage" not in argv and "postgresql://" not in json.dumps(job)


def test_tune_storage_comes_from_the_secret_and_defaults_to_the_postgres_component(tmp_path):
    from urllib.parse import urlsplit

    objs = rendered("cpu-tune")
    _, container = _tune_job(objs)
    (entry,) = [e for e in container["env"] if e["name"] == "CNNLOOP_TUNE_STORAGE"]
    assert "value" not in entry
    ref = entry["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "CNNLOOP_TUNE_STORAGE" and not ref.get("optional")
    secret = one(objs, "Secret")
    assert ref["name"] == secret["metadata"]["name"]
    url = urlsplit(base64.b64decode(secret["data"]["CNNLOOP_TUNE_STORAGE"]).decode())
    assert url.scheme.startswith("postgresql"), "SQLite cannot be shared across pods"
    assert "REPLACE-ME" in url.password, "the placeholder must fail closed"
    with_postgres = _overlay(tmp_path, "resources: [K8S/overlays/cpu-tune]\ncomponents: [K8S/components/postgres]\n")
    service = one(with_postgres, "Service", "cnnloop-postgres")
    assert (url.hostname, url.port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])


def test_a_private_overlay_replacing_the_secret_keeps_the_tune_storage(tmp_path):
    url = "postgresql://optuna:pw@db.example.com:5432/optuna"
    secrets = ("CNNLOOP_API_TOKEN=" + "a" * 24 + "\nCNNLOOP_PREDICT_TOKEN=\n"
               "CNNLOOP_LOG_URL=postgresql://cnnloop:pw@db.example.com:5432/cnnloop\n"
               f"CNNLOOP_TUNE_STORAGE={url}\n")
    replace = "secretGenerator:\n  - {name: cnnloop-secrets, behavior: replace, envs: [secrets.env]}\n"
    # the private overlay on top of the component's overlay, and the component on top of a private overlay
    on_top, below, tune = tmp_path / "on-top", tmp_path / "prod", tmp_path / "tune"
    for d in (on_top, below, tune):
        d.mkdir()
    for d in (on_top, below):
        (d / "secrets.env").write_text(secrets)
    layered = [_overlay(on_top, "resources: [K8S/overlays/cpu-tune]\n" + replace)]
    _overlay(below, "resources: [K8S/overlays/cpu]\n" + replace)
    layered.append(_overlay(tune, "resources: [../prod]\ncomponents: [K8S/components/tuning]\n"))
    for objs in layered:
        assert base64.b64decode(one(objs, "Secret")["data"]["CNNLOOP_TUNE_STORAGE"]).decode() == url
        assert dangling_config_refs(objs) == []
        _tune_job(objs)


def test_tune_workers_read_the_training_data_read_only_and_size_torch_to_their_cpu_limit():
    job, container = _tune_job(rendered("cpu-tune"))
    pod = job["spec"]["template"]["spec"]
    data = Path(_tune_argv(container)[2])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) in (data, *data.parents)]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"] == {"claimName": "cnnloop-training-data", "readOnly": True}
    assert container["image"].startswith(TRAIN_IMAGE + ":") and pod["securityContext"]["runAsUser"] == TRAIN_UID
    for name in ("CNNLOOP_TRAIN_NUM_THREADS", "OMP_NUM_THREADS"):
        (entry,) = [e for e in container["env"] if e["name"] == name]
        assert entry["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu", name
        assert entry["valueFrom"]["resourceFieldRef"].get("containerName", "tune") == container["name"]


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
    (tmp_path / "secrets.env").write_text("CNNLOOP_API_TOKEN=" + "a" * 24 + "\nCNNLOOP_PREDICT_TOKEN=\n"
                                          "CNNLOOP_LOG_URL=postgresql://cnnloop:pw@db.example.com:5432/cnnloop\n")
    objs = _overlay(tmp_path, "resources: [K8S/overlays/gpu]\nsecretGenerator:\n"
                              "  - {name: cnnloop-secrets, behavior: replace, envs: [secrets.env]}\n")
    secret = one(objs, "Secret")
    assert set(secret["data"]) == {"CNNLOOP_API_TOKEN", "CNNLOOP_PREDICT_TOKEN", "CNNLOOP_LOG_URL"}
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for _, c, _ in containers(objs)
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {secret["metadata"]["name"]}
    assert dangling_config_refs(objs) == []  # the AWS key refs are optional: IRSA needs none


# --- tests: the prediction log's database and the postgres component ----------------------------------

# Rules written for cnnloop's own containers, replaced for the third-party postgres container by the
# postgres-specific tests below: "probes" looks only at the service image's containers, "ConfigMap attached"
# wants cnnloop's settings (postgres reads none of them), "writable paths mounted" checks CNNLOOP_WORK_DIR.
CNNLOOP_ONLY_RULES = {"probes", "ConfigMap attached", "writable paths mounted"}


@pytest.fixture(scope="module")
def with_postgres(tmp_path_factory) -> list[dict]:
    """The cpu overlay plus the postgres component, as a private overlay would add it."""
    return _overlay(tmp_path_factory.mktemp("postgres"),
                    "resources: [K8S/overlays/cpu]\ncomponents: [K8S/components/postgres]\n")


def _postgres(objs: list[dict]) -> tuple[dict, dict]:
    statefulset = one(objs, "StatefulSet", "cnnloop-postgres")
    return statefulset, statefulset["spec"]["template"]["spec"]["containers"][0]


def _secret_values(objs: list[dict]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in one(objs, "Secret")["data"].items()}


@pytest.mark.parametrize("target", TARGETS)
def test_service_and_retrain_read_the_log_url_from_the_secret(target):
    objs = rendered(target)
    for spec in (service_pod_spec(objs), retrain_pod_spec(objs)):
        ref = next(e for e in spec["containers"][0]["env"] if e["name"] == "CNNLOOP_LOG_URL")["valueFrom"]["secretKeyRef"]
        assert ref["key"] == "CNNLOOP_LOG_URL" and not ref.get("optional")  # without it each pod keeps its own log
        assert ref["name"] == one(objs, "Secret")["metadata"]["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_postgres_component_is_opt_in(target):
    assert find(rendered(target), "StatefulSet") == []


@pytest.mark.parametrize("rule", RULES)
def test_postgres_component_passes_the_rules_every_target_gets(with_postgres, rule):
    objs = json.loads(json.dumps(with_postgres))
    if rule in CNNLOOP_ONLY_RULES:
        objs = [o for o in objs if o["kind"] != "StatefulSet"]  # cnnloop's own containers still get it
    assert RULES[rule](objs) == []


def test_postgres_probes_ask_pg_isready(with_postgres):
    _, container = _postgres(with_postgres)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "pg_isready" in " ".join(container[probe]["exec"]["command"]), probe


def test_postgres_writes_only_to_mounted_volumes(with_postgres):
    statefulset, container = _postgres(with_postgres)
    mounts = {m["name"]: Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")}
    env = {e["name"]: e.get("value") for e in container["env"]}
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    pgdata = Path(env["PGDATA"])
    assert [name for name, path in mounts.items() if path in pgdata.parents] == ["data"] and "data" in claims, \
        "PGDATA must live on the PVC, in a subdirectory of its mount"
    for path in (Path("/var/run/postgresql"), Path("/tmp")):
        assert path in mounts.values(), f"{path} is on the read-only root filesystem"


def test_postgres_refuses_the_placeholder_password(with_postgres, tmp_path):
    _, container = _postgres(with_postgres)
    assert container["command"] == ["/bin/sh", "-c"]
    entrypoint = tmp_path / "docker-entrypoint.sh"  # stands in for the image's, which would init and serve
    entrypoint.write_text("#!/bin/sh\necho started \"$@\"\n")
    entrypoint.chmod(0o755)
    placeholder = _secret_values(with_postgres)["POSTGRES_PASSWORD"]
    for password, started in ((placeholder, False), ("", False), ("b" * 24, True)):
        env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "POSTGRES_PASSWORD": password}
        proc = subprocess.run(["/bin/sh", "-c", container["args"][0]], env=env, capture_output=True, text=True, timeout=30)
        assert (proc.returncode == 0 and proc.stdout.strip() == "started postgres") == started, (password, proc)


def test_postgres_service_selects_the_statefulset_pods(with_postgres):
    statefulset, container = _postgres(with_postgres)
    service = one(with_postgres, "Service", statefulset["spec"]["serviceName"])
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service_pods = one(with_postgres, "Deployment", "cnnloop")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= service_pods.items()
    target = service["spec"]["ports"][0]["targetPort"]
    assert target in {p["name"] for p in container["ports"]}


def test_only_cnnloop_pods_reach_postgres_and_they_may(with_postgres):
    statefulset, _ = _postgres(with_postgres)
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    policy = next(p for p in find(with_postgres, "NetworkPolicy")
                  if p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items())
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and not policy["spec"].get("egress")
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 5432, "protocol": "TCP"}]
    admitted = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert admitted == [{"app.kubernetes.io/name": "cnnloop", "app.kubernetes.io/component": c} for c in ("service", "train")]
    for name in ("cnnloop", "cnnloop-train"):  # their own egress policies let them out to it (any address, as for a managed one)
        egress = one(with_postgres, "NetworkPolicy", name)["spec"]["egress"]
        assert any({"port": 5432, "protocol": "TCP"} in r["ports"] and not r.get("to") for r in egress), name


def test_placeholder_log_url_points_at_the_postgres_service(with_postgres):
    from urllib.parse import urlsplit

    statefulset, container = _postgres(with_postgres)
    url = urlsplit(_secret_values(with_postgres)["CNNLOOP_LOG_URL"])
    service = one(with_postgres, "Service", "cnnloop-postgres")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert url.scheme == "postgresql"
    assert (url.hostname, url.port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    assert (url.username, url.path.lstrip("/")) == (env["POSTGRES_USER"], env["POSTGRES_DB"])
    assert url.password == _secret_values(with_postgres)["POSTGRES_PASSWORD"]  # both placeholders, replaced together
