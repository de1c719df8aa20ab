"""The documentation site (mkdocs.yml: docs/, the files they link to, the API reference from the docstrings)
builds with warnings as errors, and that build fails on a broken link, a missing result file or a stale API name.

Each test builds the site as ``make docs`` does (``python -m mkdocs build --strict``); the failing builds are
planted in a copy of docs/ beside the real mkdocs.yml and hook.  Three builds: 15-19 s in pytest, 18-24 s wall, on
the 2-core EPYC at load average 4-5 (the API pages are most of each build).
"""

from __future__ import annotations

import ast
import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def build(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config_dir / "mkdocs.yml"),
                           "-d", str(site)], cwd=config_dir, capture_output=True, text=True, timeout=TIMEOUT_S)


def warnings_of(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(("WARNING", "ERROR"))]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = build(ROOT, out)
    assert result.returncode == 0 and not warnings_of(result), result.stdout + result.stderr
    return out


def ids(page: Path) -> set[str]:
    return set(re.findall(r'id="([^"]+)"', page.read_text()))


def text(page: Path) -> str:
    """The page as a reader sees it: no tags (signatures are highlighted token by token), entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def all_of(module: str) -> list[str]:
    """``__all__`` of a package, read from its source (importing it would load PyTorch)."""
    tree = ast.parse((ROOT / "src" / "mobilenets" / module / "__init__.py").read_text())
    return next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(target, "id", None) == "__all__" for target in node.targets))


def test_the_api_reference_shows_the_top_level_names_with_their_signatures(site):
    page = text(site / "api" / "model.html")
    # every name `import mobilenets` gives, read from the package's own table of them
    tree = ast.parse((ROOT / "src" / "mobilenets" / "__init__.py").read_text())
    exports = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], "id", None) == "_EXPORTS")
    exports.update(cost="cost", measure="cost")  # imported eagerly, beside the table
    documented = ids(site / "api" / "model.html")
    assert not [name for name, module in exports.items() if f"mobilenets.{module}.{name}" not in documented]
    # the signature as written in builders.py, and a sentence of its docstring
    assert "alpha: float | None = None" in page and "weights: str | os.PathLike" in page
    assert "with width multiplier" in page
    assert ":class:" not in page and ":func:" not in page  # Sphinx roles are shown as code


@pytest.mark.parametrize("package, page, not_documented", [
    ("deploy", "deploy", set()),
    # submodules; resolve is also a submodule's name, its function is shown as mobilenets.weights.resolve.resolve
    ("weights", "weights", {"download", "registry", "resolve"}),
    # assigned by unpacking a tuple (``LAST, BEST, ... = ...``), which griffe does not read as names
    ("train", "train", {"BEST", "LAST", "LOCK", "METRICS"}),
    ("quantize", "quantize", set()),
])
def test_the_api_reference_documents_every_public_name(site, package, page, not_documented):
    documented = ids(site / "api" / f"{page}.html")
    missing = [name for name in all_of(package) if name not in not_documented
               and f"mobilenets.{package}.{name}" not in documented]
    assert not missing


@pytest.mark.parametrize("page, names", [
    ("deploy", ["compile", "export", "load_exported", "parity", "Predictor", "Predictor.__call__"]),
    ("weights", ["pretrained", "convert", "convert_file", "load", "from_keras", "from_tf_slim", "from_timm",
                 "resolve.resolve"]),
    ("predict", ["predict", "model_for", "Prediction"]),
    ("train", ["TrainConfig", "TrainConfig.lr", "train", "finetune_preset"]),
])
def test_the_entry_points_users_call_are_documented(site, page, names):
    documented = ids(site / "api" / f"{page}.html")
    assert {f"mobilenets.{page}.{name}" for name in names} <= documented


@pytest.mark.parametrize("module, page, name", [
    ("evaluate", "predict", "evaluate_checkpoint"), ("pick", "benchmark", "pick_model"),
    ("benchmark", "benchmark", "benchmark"), ("paper", "paper", "table2"),
])
def test_the_modules_without_all_are_documented(site, module, page, name):
    assert f"mobilenets.{module}.{name}" in ids(site / "api" / f"{page}.html")


def test_links_outside_docs_reach_the_repository_files(site):
    # docs/deploy.md links ../benchmarks/results/grid.md; docs/index.md the README's sections
    deploy = (site / "deploy.html").read_text()
    assert 'href="repo/benchmarks/results/grid.html"' in deploy
    assert (site / "repo" / "benchmarks" / "results" / "grid.html").is_file()
    assert 'src="repo/benchmarks/results/inference.png"' in deploy
    assert (site / "repo" / "benchmarks" / "results" / "inference.png").read_bytes() == \
        (ROOT / "benchmarks" / "results" / "inference.png").read_bytes()
    assert 'href="repo/index.html#install"' in (site / "index.html").read_text()
    assert 'id="install"' in (site / "repo" / "index.html").read_text()  # the README, rendered


def planted(tmp_path: Path, page: str, text: str) -> Path:
    """The docs build with ``text`` added to docs/``page``: docs/ and the config copied, the rest linked."""
    for name in ("docs", "tools"):
        shutil.copytree(ROOT / name, tmp_path / name)
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("src", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    with open(tmp_path / "docs" / page, "a") as f:
        f.write(text)
    return tmp_path


# Under --strict any one warning fails the build, so the three links are planted in one build (one build
# each would cost 5 s more apiece): the test asserts that each is reported, and that nothing else is.
BROKEN_LINKS = {
    "See [the old guide](quantization.md).":  # a page that does not exist
        "Doc file 'index.md' contains a link 'quantization.md', but the target is not found among documentation "
        "files",
    "Measured: [table](../benchmarks/results/no_such_run.md).":  # a result file that does not exist
        "Doc file 'index.md' contains a link '../benchmarks/results/no_such_run.md', but the target is not found",
    "See [install](../README.md#installation).":  # a README section that does not exist
        "does not contain an anchor '#installation'",
}


def test_the_strict_build_fails_on_each_broken_link(tmp_path):
    result = build(planted(tmp_path / "repo", "index.md", "\n" + "\n\n".join(BROKEN_LINKS) + "\n"),
                   tmp_path / "site")
    assert result.returncode != 0
    found = warnings_of(result)
    for message in BROKEN_LINKS.values():
        assert sum(message in line for line in found) == 1, (message, found)
    assert len(found) == len(BROKEN_LINKS), found  # the copy has no other problem


def test_the_strict_build_fails_on_a_stale_api_name(tmp_path):
    result = build(planted(tmp_path / "repo", "api/deploy.md", "\n::: mobilenets.deploy.no_such_name\n"),
                   tmp_path / "site")
    assert result.returncode != 0
    found = warnings_of(result)
    assert any("Could not collect 'mobilenets.deploy.no_such_name'" in line for line in found), found
    assert not [line for line in found if line.startswith("WARNING")], found  # the copy has no other problem
