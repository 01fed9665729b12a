"""The documentation stays true: the configuration reference matches the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "config_reference", REPO / "docs/config_reference.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_up_to_date() -> None:
    generator = load_generator()
    assert generator.undocumented() == []  # every field has a description in its docstring
    written = (REPO / "docs/config-reference.md").read_text()
    assert written == generator.render(), "run `make docs` to regenerate docs/config-reference.md"
    for key in ("peers_dns", "secret_access_key", "max_concurrent", "simulate_nodes", "top_k"):
        assert f"| `{key}` |" in written
