"""The mutation check's list (tools/mutation_check.py) stays runnable: every original text still occurs once in
src, every named test still exists.  The check itself is slow and runs before a release, not here."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "tools" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_original_still_occurs_exactly_once():
    check = load()
    assert check.check_list() == []
    assert len(check.MUTANTS) >= 24


def test_every_named_test_exists():
    for mutant in load().MUTANTS:
        args = list(mutant.tests)
        while "-k" in args:  # a -k expression names no file
            i = args.index("-k")
            del args[i:i + 2]
        assert args, f"{mutant.name}: no test file named"
        for arg in args:
            path, _, name = arg.partition("::")
            assert (ROOT / path).is_file(), f"{mutant.name}: {path} does not exist"
            if name:
                function = name.split("[")[0]
                text = (ROOT / path).read_text()
                assert re.search(rf"^def {re.escape(function)}\(", text, flags=re.M), f"{mutant.name}: {arg}"


def test_the_list_covers_every_area_and_the_bugs_of_issue_13():
    mutants = load().MUTANTS
    areas = {m.area.split("/")[0] for m in mutants}
    assert {"architecture", "cost", "model", "weights", "train", "deploy", "data", "images", "predict"} <= areas
    names = {m.name for m in mutants}
    assert {"width round() instead of int()", "EMA warm-up removed (always decay)", "EMA never updates during training",
            "DDP wrapper removed (ranks never sync gradients)", "OpenVINO int8 never quantized",
            "bf16 autocast disabled and label smoothing forced to 0"} <= names


def test_a_planted_edit_is_restored(tmp_path, monkeypatch):
    """apply() writes the replacement into the copy only; run_mutant puts the original back afterwards."""
    check = load()
    monkeypatch.setattr(check, "ROOT", ROOT)
    copy = tmp_path / "copy"
    (copy / "src" / "mobilenets").mkdir(parents=True)
    target = copy / "src" / "mobilenets" / "architecture.py"
    original = (ROOT / "src" / "mobilenets" / "architecture.py").read_text()
    target.write_text(original)
    mutant = check.MUTANTS[0]
    monkeypatch.setattr(check, "run_pytest", lambda c, tests, timeout: (
        "failed" if mutant.edits[0].replacement in target.read_text() else "passed", 0.0, ""))
    verdict, _, _ = check.run_mutant(copy, mutant, timeout=1)
    assert verdict == "caught"
    assert target.read_text() == original


def test_a_mutant_that_cannot_be_planted_leaves_the_copy_unchanged(tmp_path):
    check = load()
    target = tmp_path / "src" / "mobilenets" / "architecture.py"
    target.parent.mkdir(parents=True)
    original = (ROOT / "src" / "mobilenets" / "architecture.py").read_text()
    target.write_text(original)
    first = check.MUTANTS[0].edits[0]
    broken = check.Mutant("broken", "architecture", (first, check.Edit("architecture.py", "no such text", "x")), ("t",))
    with pytest.raises(SystemExit, match="not found exactly once"):
        check.apply(tmp_path, broken)
    assert target.read_text() == original
