"""requirements.lock pins what pyproject.toml allows, and this environment runs those pins."""
from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# The gpu extra swaps onnxruntime for onnxruntime-gpu; the lock is made from the cpu,dev install.
LOCKED_EXTRAS = ("cpu", "dev")


def _locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock line `{line}` is not NAME==VERSION"
            pins[canonicalize_name(name)] = version
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in LOCKED_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize("req", _declared(), ids=str)
def test_every_declared_dependency_is_pinned_within_its_range(req):
    pins = _locked()
    name = canonicalize_name(req.name)
    assert name in pins, f"{req.name} is not in requirements.lock; run `bash .ci/refresh_lock.sh`"
    assert req.specifier.contains(pins[name], prereleases=True), \
        f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject's range {req.specifier}"


@pytest.mark.parametrize("req", _declared(), ids=str)
def test_the_environment_runs_the_locked_version(req):
    pinned = _locked()[canonicalize_name(req.name)]
    assert importlib.metadata.version(req.name) == pinned, \
        f"{req.name} {importlib.metadata.version(req.name)} is installed, the lock says {pinned}: " \
        "install with `.venv/bin/pip install -c requirements.lock -e '.[cpu,dev]'`"
