"""The house's plan, checked: the serving image's modules load without torch, no import circles,
rooms that stay split by concern."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("training", "exporters", "service")
# The torch half of exporters/: only training and `cnnloop export` load it.
TORCH_HALF = "exporters.export"


def project_modules() -> dict[str, Path]:
    mods = {}
    for room in ROOMS:
        for path in (ROOT / room).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its file, inside functions too (a circle hidden in a
    function is still a circle: it only fails later, at the call)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import module` depends on that module; `from module import name` on the module.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1
        stack.append(root); on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1
                    stack.append(w); on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop(); on_stack.discard(w); component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_module_imports_another_in_a_circle():
    mods = project_modules()
    # A package's __init__ imports nothing here, so an edge into a package is an edge into its __init__.
    graph = {name: imports_of(name, path, mods) for name, path in mods.items()}
    assert import_cycles(graph) == []


def test_the_cycle_finder_sees_a_circle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_package_inits_import_nothing_of_the_project():
    """Keeps the cycle check honest: an __init__ that imported its modules would hide circles behind it."""
    mods = project_modules()
    inits = {n: p for n, p in mods.items() if p.name == "__init__.py" and n.split(".")[0] != "service"}
    offenders = {n: sorted(imports_of(n, p, mods)) for n, p in inits.items() if n != "training.cli"}
    assert {n: i for n, i in offenders.items() if i} == {}


def test_the_serving_side_loads_with_torch_made_unimportable():
    """Every module the serving image may import (all of service/, exporters/ outside its torch half)
    loads when `import torch` fails, and none of them pulls in training/."""
    mods = sorted(n for n in project_modules()
                  if n.split(".")[0] in ("service", "exporters") and not n.startswith(TORCH_HALF))
    assert "service.service" in mods and "exporters.prediction_log.sql" in mods
    code = (
        "import importlib, sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'training'):\n"
        "            raise ImportError(f'{name} is not in the serving image')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        "print(len(sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_torch_half_is_where_torch_is_imported():
    """The other side of the contract: exporters/ imports torch only under exporters/export/."""
    offenders = []
    for name, path in project_modules().items():
        if name.startswith("exporters.") and not name.startswith(TORCH_HALF):
            tree = ast.parse(path.read_text())
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            if any(x.split(".")[0] in ("torch", "torchvision") for x in names):
                offenders.append(name)
    assert offenders == []


def loose_modules(room: str) -> list[str]:
    return sorted(p.name for p in (ROOT / room).glob("*.py"))


def test_room_tops_stay_small_enough_to_show_their_plan():
    assert len(loose_modules("training")) <= 12, loose_modules("training")
    assert len(loose_modules("exporters")) <= 10, loose_modules("exporters")
