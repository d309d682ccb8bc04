"""The layout is a contract: imports flow moe → experts → router, and no module grows past one reader's hold."""

from __future__ import annotations

from tests.helpers import REPO, run_cli

PACKAGES = ("moe", "experts", "router")
MAX_MODULE_LINES = 500


def test_no_module_is_over_the_line_limit():
    sizes = {
        path.relative_to(REPO).as_posix(): len(path.read_text().splitlines())
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
    }
    assert len(sizes) > 30, "too few modules found: is REPO right?"
    too_long = {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not too_long, f"split these along their seams (limit {MAX_MODULE_LINES} lines): {too_long}"


def test_imports_keep_the_layers_contract():
    """`lint-imports` with pyproject's contracts: moe → experts → router, training never imports experiments."""
    result = run_cli(
        "-c",
        "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout
