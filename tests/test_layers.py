"""The layer rule of ``device_runtime`` (``../shared/style.md``), read from the
imports of every module, including imports inside functions.

    core <- routing <- llm <- link <- runtime <- cli;   sim uses core and routing

``edge_service`` imports only ``device_runtime.core`` and ``device_runtime.llm``
(and the proto package); only ``device_runtime.cli`` imports ``export`` or
``edge_service``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: layer -> the device_runtime layers it may import (itself included).
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "routing": {"core", "routing"},
    "llm": {"core", "routing", "llm"},
    "link": {"core", "routing", "llm", "link"},
    "runtime": {"core", "routing", "llm", "link", "runtime"},
    "sim": {"core", "routing", "sim"},
    "cli": {"core", "routing", "llm", "link", "runtime", "sim", "cli"},
}
#: top-level packages of this repository other than device_runtime.
OTHER_PACKAGES = {"export", "edge_service", "netlab"}


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            out.append((node.lineno, base))
            # `from device_runtime import routing` imports the sub-package.
            out.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return out


def layer_violations(module: str, imports: list[tuple[int, str]]) -> list[str]:
    """Why each import of ``module`` breaks the rule (empty when none does)."""
    parts = module.split(".")
    bad: list[str] = []
    for line, name in imports:
        target = name.split(".")
        top = target[0]
        if parts[0] == "device_runtime":
            layer = parts[1] if len(parts) > 2 else None
            if layer is None:
                continue  # device_runtime/__init__.py
            if top in OTHER_PACKAGES and layer != "cli":
                bad.append(f"{module}:{line} imports {name} (only device_runtime.cli may)")
            if top == "device_runtime" and len(target) > 1 and target[1] in ALLOWED:
                if target[1] not in ALLOWED.get(layer, set()):
                    bad.append(f"{module}:{line} ({layer}) imports {name} ({target[1]})")
        elif parts[0] == "edge_service":
            if top == "device_runtime" and (len(target) < 2 or target[1] not in {"core", "llm"}):
                bad.append(f"{module}:{line} imports {name} (edge_service may use device_runtime.core/llm only)")
            if top == "export":
                bad.append(f"{module}:{line} imports {name} (edge_service never imports export)")
    return bad


def library_modules() -> list[tuple[str, Path]]:
    mods = []
    for pkg in ("device_runtime", "edge_service"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            mods.append((".".join(parts), path))
    return mods


def test_every_module_keeps_to_its_layer():
    problems = []
    for module, path in library_modules():
        is_pkg = path.name == "__init__.py"
        name = module[: -len(".__init__")] if is_pkg else module
        problems += layer_violations(name, imported_modules(path.read_text(), name, is_pkg))
    assert not problems, "layer rule broken:\n" + "\n".join(problems)


def test_every_module_is_in_a_layer():
    stray = [
        m for m, p in library_modules()
        if m.startswith("device_runtime.") and m.count(".") == 1 and p.name != "__init__.py"
    ]
    assert stray == [], f"modules outside any layer sub-package: {stray}"


@pytest.mark.parametrize(
    "module, source",
    [
        ("device_runtime.routing.cost_model", "from device_runtime.link.edge_client import EdgeClient"),
        ("device_runtime.sim.simulate", "import device_runtime.runtime.orchestrator"),
        ("device_runtime.llm.slm", "def f():\n    from device_runtime.runtime import telemetry\n"),
        ("device_runtime.runtime.orchestrator", "from edge_service.server import serve"),
        ("device_runtime.routing.routers.bert", "from export.model import load_checkpoint"),
        ("edge_service.server", "from device_runtime.link import edge_client"),
        ("edge_service.server", "from device_runtime import routing"),
        ("device_runtime.link.profile", "from ..runtime import orchestrator"),
    ],
)
def test_a_planted_bad_import_is_caught(module, source):
    assert layer_violations(module, imported_modules(source, module, False))


@pytest.mark.parametrize(
    "module, source",
    [
        ("device_runtime.runtime.orchestrator", "from device_runtime.link.edge_client import EdgeClient"),
        ("device_runtime.cli.bench", "from export.router_bench import run_router_bench"),
        ("edge_service.server", "from device_runtime.llm.conversation import LlamaConversation"),
        ("device_runtime.sim.simulate", "from device_runtime.routing import cost_model"),
        ("device_runtime.link.profile", "from .estimation import fit_link"),
    ],
)
def test_allowed_imports_pass(module, source):
    assert layer_violations(module, imported_modules(source, module, False)) == []
