"""The package direction: devices depend on the base package only; the server never on devices.

Checked on the source (every import, including those inside functions), so a lazy import
cannot sneak a dependency past the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Shared by devices and the server: what the agent may use, and nothing it cannot install.
BASE = (
    "edgefl.protocol",
    "edgefl.transport",
    "edgefl.models",
    "edgefl.packages.format",
    "edgefl.packages.signing",
    "edgefl.packages.artifacts",
    "edgefl.observability",
)
# The server side, which must never reach into the device agent.
SERVER = (
    "edgefl",
    "edgefl.controller",
    "edgefl.combiner",
    "edgefl.aggregation",
    "edgefl.store",
    "edgefl.api",
    "edgefl.client",  # the REST API's Python client (operators' side, not devices')
    "edgefl.broker",
    "edgefl.auth",
    "edgefl.telemetry",
    "edgefl.packages",
    "edgefl.tasks",
    "edgefl.protocol",
    "edgefl.transport",
    "edgefl.models",
    "edgefl.observability",
)
# Simulation and orchestration run devices in-process, so they may import the agent.
MAY_RUN_DEVICES = ("edgefl.fleet", "edgefl.deploy", "edgefl.demo", "edgefl.cli")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _sources("edgefl"), ids=lambda p: _module(p))
def test_server_modules_do_not_import_the_device_agent(path: Path) -> None:
    module = _module(path)
    if _within(module, MAY_RUN_DEVICES):
        return
    assert module == "edgefl" or _within(module, SERVER[1:]), f"{module} is in no layer"
    agent_imports = sorted(i for i in _imports(path) if _within(i, ("device_agent",)))
    assert not agent_imports, f"{module} imports {agent_imports}"


@pytest.mark.parametrize("path", _sources("device_agent"), ids=lambda p: _module(p))
def test_the_agent_uses_only_the_base_package(path: Path) -> None:
    edgefl_imports = sorted(i for i in _imports(path) if _within(i, ("edgefl",)))
    outside = [i for i in edgefl_imports if not _within(i, BASE)]
    assert not outside, f"{_module(path)} imports server modules {outside}"


def test_the_rule_sees_lazy_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from device_agent.agent import DeviceAgent\n")
    assert "device_agent.agent" in _imports(src)
