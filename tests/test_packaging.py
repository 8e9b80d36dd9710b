"""pyproject.toml declares what the package imports; the sdist manifest covers the build inputs.

The full check (a wheel in a fresh venv running `g2tr bench` outside the clone) is
tools/wheel_check.sh, run by tools/test.sh; this is the fast, static half of it.
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "g2tr_kernels"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def imported_modules(path: Path) -> set:
    """Top-level names of every absolute import in a file, module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def third_party(names: set) -> set:
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("g2tr_kernels", "__future__")}


@functools.lru_cache(maxsize=None)
def _top_level_to_distributions() -> dict:
    return md.packages_distributions()  # scans every installed distribution: once


def distributions(module: str) -> set:
    return {d.lower().replace("_", "-") for d in _top_level_to_distributions().get(module, [])}


def test_core_imports_are_core_dependencies():
    # what `import g2tr_kernels` runs at module level: __init__ and what it imports, transitively
    core = {_name(r) for r in PROJECT["dependencies"]}
    todo = [PACKAGE / "__init__.py"]
    seen = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: imports inside functions are lazy
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = path.parent if node.level == 1 else path.parent.parent
                for part in filter(None, [node.module] + [a.name for a in node.names]):
                    for candidate in (base / part.replace(".", "/") / "__init__.py",
                                      base / (part.replace(".", "/") + ".py")):
                        if candidate.exists():
                            todo.append(candidate)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "level", 0) == 0:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in third_party({n.split(".")[0] for n in names}):
                    assert distributions(module) & core, (
                        f"{path.relative_to(ROOT)} imports {module} at import time; "
                        f"pyproject.toml dependencies {sorted(core)} do not provide it"
                    )
    assert len(seen) > 3


def test_every_import_is_declared_somewhere():
    declared = {_name(r) for r in PROJECT["dependencies"]}
    for requirements in PROJECT["optional-dependencies"].values():
        declared |= {_name(r) for r in requirements}
    undeclared = {}
    for path in PACKAGE.rglob("*.py"):
        for module in third_party(imported_modules(path)):
            if module == "vllm":  # the vLLM plugin runs inside vLLM's own environment
                continue
            if not distributions(module) & declared:
                undeclared.setdefault(module, []).append(str(path.relative_to(ROOT)))
    assert not undeclared, f"imports no dependency or extra of pyproject.toml provides: {undeclared}"


def test_bench_extra_covers_the_bench_command():
    bench = {_name(r) for r in PROJECT["optional-dependencies"]["bench"]}
    for module in third_party(set().union(*(imported_modules(p) for p in (PACKAGE / "bench").rglob("*.py")),
                                          imported_modules(PACKAGE / "cli.py"))):
        if module in ("torch", "numpy", "triton"):
            continue  # core, or optional in the bench (triton is timed only where it runs)
        assert distributions(module) & bench, f"g2tr bench imports {module}; the bench extra lacks it"


def test_manifest_ships_the_build_inputs_and_types():
    manifest = (ROOT / "MANIFEST.in").read_text()
    for needed in ("recursive-include csrc", "recursive-include python", "CMakeLists.txt", "LICENSE", "py.typed"):
        assert needed in manifest
    assert (PACKAGE / "py.typed").exists()
    assert 'package_data={"g2tr_kernels": ["py.typed"]}' in (ROOT / "setup.py").read_text()
