"""docs/CONTRACTS.md is generated from the code: it must describe every module as the code stands."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "contracts.py"


def test_contracts_doc_is_current() -> None:
    spec = importlib.util.spec_from_file_location("contracts", SCRIPT)
    contracts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(contracts)
    assert contracts.OUT.read_text() == contracts.render(), "run: python scripts/contracts.py"
    for f in contracts.PACKAGE.rglob("*.py"):
        if f.name != "__main__.py":
            name = ".".join(f.relative_to(contracts.ROOT).with_suffix("").parts).removesuffix(".__init__")
            assert f"### `{name}`" in contracts.OUT.read_text()
