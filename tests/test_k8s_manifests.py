"""k8s/: every kustomize target renders, every object passes the Kubernetes 1.32 OpenAPI schema in
strict mode (unknown fields fail), and the deployment rules hold, one test per rule.

Each rule is a function returning its violations; `test_rule_flags_a_broken_object` feeds every
rule a deliberately broken copy of a rendered object, so a rule that can no longer fail is caught.
kubectl (with its built-in kustomize) is required: without it these tests fail, never skip.
"""
from __future__ import annotations

import json

import pytest


from tests.k8s_render import (
    BREAKERS, GPU_TARGETS, RULES, TARGETS, retrain_pod_spec, config_from_configmap_missing, containers,
    dangling_config_refs, escalating_containers, gpu_requesters, literal_settings, missing_probes,
    missing_resources, mounted_service_account_tokens, rendered, root_containers, schema_violations,
    service_containers, unconfined_seccomp, unmounted_writable_paths, unpinned_images,
    writable_root_filesystems,
)


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
    retrain_pod_spec(objs)["containers"][0]["resources"]["limits"]["cpu"] = {"not": "a quantity"}
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
