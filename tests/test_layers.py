"""The layering DESIGN.md states, read from the source: kernels <- engine.models <- engine core <- services <- cli.

Every import counts, the ones inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("serve", "ingest", "dream", "analysis")
# The kernel entry points a service must reach only through the Engine (or a model's own ``render``).
KERNEL_CALLS = {"reproject", "BACKENDS", "triton_kernel", "numba_kernel", "grid_sample", "reference"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted([*ROOT.glob("engine/**/*.py"), *ROOT.glob("kernels/**/*.py")]):
        if "proto" in path.relative_to(ROOT).parts[:2] and path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue  # generated code
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Every module name imported by ``path``, with ``from X import y`` giving both X and X.y."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


MODULES = _modules()
IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "kernels":
        return "kernels"
    if module == "engine.config":
        return "settings"  # plain dataclasses and defaults, below the models
    if len(parts) > 1 and parts[1] == "models":
        return "models"
    if len(parts) > 1 and parts[1] in SERVICES:
        return parts[1]
    if module in ("engine.cli", "engine.demo", "engine.client"):
        return "cli"
    return "core"


def _ours(imported: set[str]) -> set[str]:
    return {m for m in imported if m.split(".")[0] in ("engine", "kernels") and m in MODULES}


def test_the_source_tree_is_found():
    assert {"kernels.reproject", "engine.pipeline", "engine.models.clip", "engine.serve.service"} <= set(MODULES)


@pytest.mark.parametrize("name", [m for m in MODULES if _layer(m) in ("kernels", "settings")])
def test_kernels_and_settings_import_nothing_from_the_engine(name):
    assert not {m for m in _ours(IMPORTS[name]) if m.split(".")[0] == "engine"} - {name}


@pytest.mark.parametrize("name", [m for m in MODULES if _layer(m) == "models"])
def test_models_import_only_kernels_and_the_settings(name):
    above = {m for m in _ours(IMPORTS[name]) if _layer(m) not in ("kernels", "settings", "models")}
    assert not above, f"{name} imports {sorted(above)}, a layer above the models"


@pytest.mark.parametrize("name", [m for m in MODULES if _layer(m) == "core"])
def test_the_core_imports_no_service_and_no_command(name):
    above = {m for m in _ours(IMPORTS[name]) if _layer(m) in (*SERVICES, "cli")}
    assert not above, f"{name} imports {sorted(above)}: the core must not depend on the shells around it"


@pytest.mark.parametrize("name", [m for m in MODULES if _layer(m) in SERVICES])
def test_services_call_no_kernel_themselves(name):
    calls = {m for m in IMPORTS[name] if m.split(".")[0] == "kernels" and m.split(".")[-1] in KERNEL_CALLS}
    assert not calls, f"{name} imports {sorted(calls)}: views are cut by the Engine (or a model's render), not by a shell"


def test_no_import_cycle_between_packages():
    """Between layers and services, imports go one way. Services may share a peer's plain pieces (the dream
    params, say) and the root command's argparse types, but no two packages may import each other, except
    the root command, which imports each service's ``cli`` lazily to register it."""
    edges: dict[str, set[str]] = {}
    for name, imported in IMPORTS.items():
        for other in _ours(imported):
            a, b = _layer(name), _layer(other)
            if a != b:
                edges.setdefault(a, set()).add(b)
    cycles = sorted((a, b) for a in edges for b in edges[a] if a in edges.get(b, ()) and a < b and "cli" not in (a, b))
    assert not cycles, f"packages that import each other: {cycles}"
