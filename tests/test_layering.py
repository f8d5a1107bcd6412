"""The service package and the model package stay apart: `memstore` never imports
`engram_client`, and `engram_client` uses the service through its public modules only (the
plain client, errors, specs, storage for host tables), never the server's internals."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER_INTERNALS = ("memstore.servicer", "memstore.interceptors", "memstore.server", "memstore.steps")


def imports(package: str) -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_the_server_package_never_imports_the_model_package():
    offenders = {f: sorted(n for n in names if n.startswith("engram_client"))
                 for f, names in imports("memstore").items()}
    assert not {f: n for f, n in offenders.items() if n}


def test_the_model_package_never_imports_server_internals():
    offenders = {f: sorted(n for n in names if n.startswith(SERVER_INTERNALS))
                 for f, names in imports("engram_client").items()}
    assert not {f: n for f, n in offenders.items() if n}
