"""docs/architecture.md names every product module, so the page a newcomer reads first matches the tree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("maskclip_engine", "maskclip_service", "ls_integration", "backend", "workers")


def _section(text: str, package: str) -> str:
    """The part of the page under ``### `package/` `` up to the next ``###`` heading."""
    match = re.search(rf"^### `{package}/`\n(.*?)(?=^### |^## |\Z)", text, flags=re.M | re.S)
    assert match, f"docs/architecture.md has no section '### `{package}/`'"
    return match.group(1)


def _modules(package: str) -> list[str]:
    """Every Python module of a package but its own ``__init__``, as a path relative to the package."""
    base = ROOT / package
    return sorted(
        path.relative_to(base).as_posix()
        for path in base.rglob("*.py")
        if "__pycache__" not in path.parts and path != base / "__init__.py"
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_every_product_module_is_in_the_architecture_page(package: str) -> None:
    section = _section((ROOT / "docs" / "architecture.md").read_text(), package)
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", section))
    missing = []
    for module in _modules(package):
        folder, _, leaf = module.rpartition("/")
        # A subpackage is described by its folder's row; its modules each by their own.
        covered = module in named or (leaf == "__init__.py" and f"{folder}/" in named)
        if not covered:
            missing.append(module)
    assert not missing, f"docs/architecture.md's `{package}/` table leaves out: {', '.join(missing)}"


def test_the_page_names_no_module_that_is_gone() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    gone = []
    for package in PACKAGES:
        for name in re.findall(r"^\| `([\w/]+\.py)` \|", _section(text, package), flags=re.M):
            if not (ROOT / package / name).exists():
                gone.append(f"{package}/{name}")
    assert not gone, f"docs/architecture.md names modules that no longer exist: {', '.join(gone)}"
