"""bentofile.yaml (CPU) and bentofile.gpu.yaml build real bentos: `bentoml build` runs for real,
offline (python.lock_packages is off), into a temporary BENTOML_HOME so nothing reaches ~/bentoml.

The serving image is torch-free: the bento carries service/ and exporters/ only, and everything
the service imports (followed through every import statement, lazy ones included) must come from
the bento's requirements.
"""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BENTOFILES = {"cpu": "bentofile.yaml", "gpu": "bentofile.gpu.yaml"}
ORT_PACKAGE = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}
BUILD_TIMEOUT_S = 300
SERVING_ROOMS = ("service", "exporters")
# Both wheels install the module `onnxruntime`; this venv has the CPU one.
SAME_MODULE_AS = {"onnxruntime-gpu": "onnxruntime"}


@pytest.fixture(scope="module")
def bento_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bentoml_home")


_built: dict[str, Path] = {}


@pytest.fixture(params=list(BENTOFILES))
def bento(request, bento_home) -> tuple[str, Path]:
    """(variant, bento directory), each variant built once per module."""
    variant = request.param
    if variant not in _built:
        env = {**os.environ, "BENTOML_HOME": str(bento_home), "BENTOML_DO_NOT_TRACK": "True"}
        cmd = [sys.executable, "-m", "bentoml", "build", "-f", BENTOFILES[variant], "-o", "tag", str(ROOT)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`bentoml build -f {BENTOFILES[variant]}` took over {BUILD_TIMEOUT_S} s "
                        "(is it trying to lock packages against an index?)")
        assert proc.returncode == 0, f"bentoml build failed:\n{proc.stdout}\n{proc.stderr}"
        name, version = re.search(r"__tag__:(\S+)", proc.stdout).group(1).split(":")
        _built[variant] = bento_home / "bentos" / name / version
    return variant, _built[variant]


def requirement_names(bento_dir: Path) -> set[str]:
    lines = (bento_dir / "env" / "python" / "requirements.txt").read_text().splitlines()
    return {canonicalize_name(Requirement(line).name) for line in lines
            if line.strip() and not line.lstrip().startswith(("#", "-"))}


# --- what the service imports, statically (lazy imports inside functions included) -------------------

def module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def service_import_closure() -> tuple[set[Path], set[str]]:
    """(our files the service needs, top-level third-party modules they import), from service.service."""
    files: set[Path] = set()
    third_party: set[str] = set()
    todo = ["service.service"]
    while todo:
        name = todo.pop()
        top = name.split(".")[0]
        if top not in SERVING_ROOMS:
            if top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
            continue
        # A package's __init__ runs before any of its modules.
        for i in range(1, name.count(".") + 2):
            path = module_file(".".join(name.split(".")[:i]))
            if path is not None and path not in files:
                files.add(path)
                todo.extend(imported_names(path))
    return files, third_party


def installed_closure(requirements: set[str]) -> set[str]:
    """The distributions installing `requirements` brings, read from this venv's metadata."""
    seen: set[str] = set()
    todo = [SAME_MODULE_AS.get(r, r) for r in requirements]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


# --- tests --------------------------------------------------------------------------------------------

def test_bento_holds_every_service_and_exporters_module(bento):
    _, bento_dir = bento
    for room in SERVING_ROOMS:
        expected = {p.relative_to(ROOT) for p in (ROOT / room).rglob("*.py") if "__pycache__" not in p.parts}
        packed = {p.relative_to(bento_dir / "src") for p in (bento_dir / "src" / room).rglob("*.py")}
        assert expected and packed == expected, room


def test_bento_holds_the_labeling_page_the_service_serves(bento):
    _, bento_dir = bento
    page = bento_dir / "src" / "service" / "review_page.html"
    assert page.read_bytes() == (ROOT / "service" / "review_page.html").read_bytes()


def test_bento_holds_nothing_but_the_serving_rooms_and_its_bentofile(bento):
    _, bento_dir = bento
    top = {p.name for p in (bento_dir / "src").iterdir()}
    assert "training" not in top and "tests" not in top and "bench" not in top
    assert top - set(SERVING_ROOMS) <= set(BENTOFILES.values()), top
    assert not list((bento_dir / "src").rglob("__pycache__"))


def test_bento_requirements_carry_one_onnxruntime_and_no_torch(bento):
    variant, bento_dir = bento
    names = requirement_names(bento_dir)
    assert ORT_PACKAGE[variant] in names
    assert set(ORT_PACKAGE.values()) - {ORT_PACKAGE[variant]} & names == set(), "never both onnxruntime wheels"
    assert {"torch", "torchvision", "timm", "onnx"} & names == set()


def test_service_import_closure_needs_no_torch_and_no_training_code():
    files, third_party = service_import_closure()
    assert ROOT / "service" / "service.py" in files
    assert not any(f.relative_to(ROOT).parts[0] == "training" for f in files)
    assert {"torch", "torchvision", "timm", "onnx", "onnxscript", "sklearn", "matplotlib"} & third_party == set()


def test_bento_holds_every_module_the_service_imports(bento):
    _, bento_dir = bento
    files, _ = service_import_closure()
    missing = [str(f.relative_to(ROOT)) for f in files if not (bento_dir / "src" / f.relative_to(ROOT)).is_file()]
    assert missing == []


def test_every_package_the_service_imports_comes_from_the_bento_requirements(bento):
    _, bento_dir = bento
    _, third_party = service_import_closure()
    provided = installed_closure(requirement_names(bento_dir))
    providers = importlib.metadata.packages_distributions()
    unprovided = {m: providers.get(m) for m in third_party
                  if not {canonicalize_name(d) for d in providers.get(m, [])} & provided}
    assert unprovided == {}, f"imported by the service but not installed from the bento: {unprovided}"


def test_bento_image_is_python_311_and_runs_as_the_non_root_bentoml_user(bento):
    variant, bento_dir = bento
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert re.findall(r"^USER (\S+)", dockerfile, flags=re.MULTILINE) == ["bentoml"]
    assert "uv venv --python 3.11 " in dockerfile
    base = re.search(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE).group(1)
    if variant == "cpu":
        assert base == "python:3.11-slim"
    else:
        assert base.startswith("nvidia/cuda:12.") and "cudnn" in base, base


def test_bentofile_packages_use_the_ranges_pyproject_declares():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(r.name): r.specifier for r in map(Requirement, project["dependencies"])}
    for extra in ("cpu", "gpu"):
        declared.update({canonicalize_name(r.name): r.specifier for r in map(Requirement, project["optional-dependencies"][extra])})
    for variant, bentofile in BENTOFILES.items():
        for line in yaml.safe_load((ROOT / bentofile).read_text())["python"]["packages"]:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            assert name in declared, f"{bentofile}: {name} is not a dependency in pyproject.toml"
            if name == "onnxruntime-gpu":
                # Narrowed to the CUDA 12 builds the GPU base image carries; still inside pyproject's range.
                assert all(v in declared[name] for v in req.specifier.filter(["1.19.0", "1.22.0", "1.26.0"]))
                assert not req.specifier.contains("1.27.0")
            else:
                assert req.specifier == declared[name], f"{bentofile}: {line} vs pyproject {name}{declared[name]}"


def test_bentofiles_build_offline():
    for bentofile in BENTOFILES.values():
        assert yaml.safe_load((ROOT / bentofile).read_text())["python"]["lock_packages"] is False
