"""The API reference (docs/api/index.rst) lists every public name of every public subpackage."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api" / "index.rst"
PACKAGES = ["lqae_sklearn", "lqae_sklearn.datasets", "lqae_sklearn.encoding", "lqae_sklearn.evaluation", "lqae_sklearn.llm",
            "lqae_sklearn.model", "lqae_sklearn.plotting", "lqae_sklearn.training"]


def _documented() -> set[str]:
    """Full names the page documents: autosummary entries and ``.. data::`` under their ``currentmodule``."""
    names, module = set(), None
    for line in API_PAGE.read_text().splitlines():
        if match := re.match(r"\.\. currentmodule:: (\S+)", line):
            module = match.group(1)
        elif match := re.match(r"\.\. data:: (\w+)", line) or re.fullmatch(r"   ([A-Za-z_]\w*)", line):
            names.add(f"{module}.{match.group(1)}")
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_is_in_the_api_reference(package):
    documented = _documented()
    module = importlib.import_module(package)
    missing = []
    for name in module.__all__:
        value = getattr(module, name)
        # A re-export (lqae_sklearn.LQAE, lqae_sklearn.PRESETS) counts when the subpackage it comes from documents it.
        homes = [p for p in PACKAGES if getattr(importlib.import_module(p), name, None) is value]
        if not any(f"{home}.{name}" in documented for home in homes):
            missing.append(name)
    assert not missing, f"{package}: not in docs/api/index.rst: {missing}"
    assert documented  # the page parsed
