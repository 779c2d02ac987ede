"""The import rules of docs/architecture.md, checked by reading every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "spamkiller"

# package -> the spamkiller packages it may import (itself always allowed)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "units": set(),
    "proxyproto": set(),
    "timers": set(),
    "smtp": {"errors"},
    "tls": {"errors"},
    "config": {"errors", "units", "tls", "checks"},  # checks.symbols only, a leaf table
    "checks": {"smtp", "tls", "config", "errors", "dns", "store", "units"},  # dns/store: protocols
    "dns": {"errors", "config"},
    "store": {"errors", "config"},
    "relay": {"smtp", "tls", "errors", "config", "timers"},
    "observability": set(),
    "server": {
        "errors",
        "units",
        "timers",
        "smtp",
        "tls",
        "config",
        "checks",
        "relay",
        "observability",
        "proxyproto",
        "dns",
        "store",
    },
    "cli": {"server", "config", "errors", "observability"},
    "__init__": set(),
    "__main__": {"cli"},
}


def package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "spamkiller" and len(parts) > 1:
                found.add(parts[1])
    return found


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_module_imports_only_what_its_layer_may(path: Path) -> None:
    package = package_of(path)
    assert package in ALLOWED, f"{package} is not in docs/architecture.md's table"
    outside = imported_packages(path) - ALLOWED[package] - {package}
    assert not outside, f"{path.relative_to(SRC)} imports {sorted(outside)}"


def test_smtp_is_stdlib_only() -> None:
    third_party = {"asyncio", "ssl", "socket", "pydantic", "yaml", "cryptography", "uvloop"}
    for path in (SRC / "smtp").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                for mod in mods:
                    assert mod.split(".")[0] not in third_party, f"{path.name} imports {mod}"
