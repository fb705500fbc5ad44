"""Grid file checks: each hand-made bad grid file fails in load_grid or main with one message naming the fix."""

import copy
import re

import pytest
import yaml

from scripts.grid import main, plan_runs, run_overrides
from scripts.grid_config import RUNNER_KEYS, GridFileError, load_grid

BUNDLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "calsam_bundle"

GOOD = {
    "seeds": [0, 1],
    "train_configs": ["configs/train.yaml"],
    "evaluate_configs": ["configs/train.yaml", "configs/evaluate.yaml"],
    "overrides": {"max_epochs": 1, "fip#every": 16},
    "corruptions": {"kinds": ["noise"], "severities": [1, 3], "max_cases": 2, "seed": 0},
    "methods": {
        "baseline": {"label": "Baseline", "overrides": {"fip#enabled": False}},
        "calsam": {"label": "CalSAM", "overrides": {"fip#enabled": True}},
        "temperature": {"model_from": "baseline", "evaluate_overrides": {"apply_temperature": True}},
    },
    "report": {"baseline": "baseline", "proposed": "calsam", "comparisons": [["calsam", "baseline"]]},
}


def _set(path: str, value):
    """Return an edit of GOOD that sets the key at a dotted ``path``; ``None`` as value deletes the key."""

    def edit(content: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            content = content[key]
        if value is None:
            del content[last]
        else:
            content[last] = value

    return edit


def _write(tmp_path, edit=None, output_dir=True) -> str:
    content = copy.deepcopy(GOOD)
    if output_dir:
        content["output_dir"] = str(tmp_path / "grid")
    if edit is not None:
        edit(content)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return str(path)


BAD_EDITS = [
    ("unknown top key", _set("seed", [0]), "the file has unknown keys ['seed']"),
    ("seeds missing", _set("seeds", None), "'seeds' must be a non-empty list of integers, got None"),
    ("seeds empty", _set("seeds", []), "'seeds' must be a non-empty list of integers, got []"),
    ("seeds text", _set("seeds", ["a"]), "each of 'seeds' must be an integer >= 0, got 'a'"),
    ("seeds float", _set("seeds", [0.5]), "each of 'seeds' must be an integer >= 0, got 0.5"),
    ("seeds bool", _set("seeds", [True]), "each of 'seeds' must be an integer >= 0, got True"),
    ("seeds negative", _set("seeds", [-1]), "each of 'seeds' must be an integer >= 0, got -1"),
    ("seeds repeated", _set("seeds", [0, 0]), "'seeds' has repeated values: [0, 0]"),
    ("split seed text", _set("split_seed", "zero"), "'split_seed' must be an integer >= 0, got 'zero'"),
    ("output_dir empty", _set("output_dir", ""), "'output_dir' must be a non-empty string, got ''"),
    ("methods missing", _set("methods", None), "'methods' must map method names to settings, got None"),
    ("method unknown key", _set("methods.calsam.overide", {}), "method 'calsam' has unknown keys ['overide']"),
    ("method name number", lambda content: content["methods"].update({1: {}}), "method name 1 must start with"),
    ("method name slash", _set("methods.a/b", {}), "method name 'a/b' must start with a letter or digit"),
    ("method overrides list", _set("methods.calsam.overrides", ["x"]), "method 'calsam' overrides must be a mapping"),
    ("model_from missing", _set("methods.temperature.model_from", "basline"), "model_from 'basline', which is not"),
    ("model_from list", _set("methods.temperature.model_from", ["baseline"]), "has model_from ['baseline']; give"),
    ("model_from self", _set("methods.temperature.model_from", "temperature"), "does not train a model itself"),
    ("model_from chain", _set("methods.ts2", {"model_from": "temperature"}), "method 'ts2' has model_from"),
    ("model_from overrides", _set("methods.temperature.overrides", {"x": 1}), "move its 'overrides' to"),
    ("train configs missing", _set("train_configs", ["configs/trian.yaml"]), "config files that do not exist"),
    ("train configs text", _set("train_configs", "configs/train.yaml"), "must be a non-empty list of config files"),
    ("override typo", _set("overrides.max_epoch", 3), "'overrides' sets ids ['max_epoch'] that the bundle configs"),
    ("method override typo", _set("methods.calsam.overrides.fip#enabeld", True), "ids ['fip#enabeld']"),
    ("evaluate override typo", _set("methods.temperature.evaluate_overrides.apply_temprature", True), "temprature"),
    ("override runner key", _set("overrides.seed", 3), "'overrides' sets ['seed'], which scripts/grid.py sets"),
    ("override output_dir", _set("methods.calsam.overrides.output_dir", "x"), "sets ['output_dir'], which"),
    ("report baseline", _set("report.baseline", "basline"), "report baseline: 'basline' is not one of the methods"),
    ("report proposed", _set("report.proposed", "calSAM"), "report proposed: 'calSAM' is not one of the methods"),
    ("report unknown key", _set("report.baselines", "baseline"), "'report' has unknown keys ['baselines']"),
    ("comparison unknown", _set("report.comparisons", [["calsam", "fipp"]]), "'fipp' is not one of the methods"),
    ("comparison flat", _set("report.comparisons", ["calsam", "baseline"]), "must be a [method, method] pair"),
    ("comparison text", _set("report.comparisons", "calsam"), "report comparisons must be a list of"),
    ("comparison self", _set("report.comparisons", [["calsam", "calsam"]]), "compares a method with itself"),
    ("claims not pair", _set("report.reference", {"claims": {"ece_reduction_percent": 27}}), "[low, high] pair"),
    ("corruption kind", _set("corruptions.kinds", ["motoin"]), "corruptions kinds has invalid values ['motoin']"),
    ("corruption kinds text", _set("corruptions.kinds", "motion"), "corruptions kinds must be a list drawn from"),
    ("severity zero", _set("corruptions.severities", [0, 3]), "corruptions severities has invalid values [0]"),
    ("severity six", _set("corruptions.severities", [6]), "corruptions severities has invalid values [6]"),
    ("severity text", _set("corruptions.severities", ["high"]), "corruptions severities has invalid values ['high']"),
    ("severities empty", _set("corruptions.severities", []), "corruptions severities is empty"),
    ("max cases zero", _set("corruptions.max_cases", 0), "corruptions max_cases (or null for all target cases)"),
    ("corruption unknown key", _set("corruptions.severity", [1]), "'corruptions' has unknown keys ['severity']"),
]


@pytest.mark.parametrize("edit, message", [case[1:] for case in BAD_EDITS], ids=[case[0] for case in BAD_EDITS])
def test_bad_grid_file_message(tmp_path, edit, message):
    path = _write(tmp_path, edit)
    with pytest.raises(GridFileError, match=re.escape(message)) as raised:
        load_grid(path, BUNDLE)
    assert str(raised.value).startswith(f"Grid file {path!r}")


def test_good_grid_file_loads(tmp_path):
    grid = load_grid(_write(tmp_path), BUNDLE)
    assert grid.seeds == (0, 1)
    assert grid.corruptions == {"kinds": ["noise"], "severities": [1, 3], "max_cases": 2, "seed": 0}
    assert grid.methods["temperature"].label == "temperature"


def test_one_method_no_comparisons(tmp_path):
    def keep_baseline(content):
        content["methods"] = {"baseline": content["methods"]["baseline"]}
        del content["report"]

    grid = load_grid(_write(tmp_path, keep_baseline), BUNDLE)
    assert grid.report["comparisons"] == []


RAW_FILES = [
    ("empty", "", "the file is empty"),
    ("comment only", "# nothing\n", "the file is empty"),
    ("list", "- a\n- b\n", "the file must contain a mapping of keys, got a list"),
    ("syntax", "seeds: [0, 1\nmethods:\n  a: {}\n", "is not valid YAML at line 2, column 8: expected ',' or ']'"),
    ("tab", "seeds: [0]\nmethods:\n\ta: {}\n", "indent with spaces, YAML does not allow tabs"),
    ("repeated key", "seeds: [0]\nseeds: [1]\n", "at line 2, column 1: key 'seeds' is repeated in one mapping"),
    ("repeated method", "methods:\n  a: {}\n  a: {}\n", "line 3, column 3: key 'a' is repeated"),
]


@pytest.mark.parametrize("text, message", [case[1:] for case in RAW_FILES], ids=[case[0] for case in RAW_FILES])
def test_bad_yaml_text_message(tmp_path, text, message):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(GridFileError, match=re.escape(message)):
        load_grid(path, BUNDLE)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(GridFileError, match="is not UTF-8 text"):
        load_grid(path, BUNDLE)


def test_runner_keys_match_run_overrides(tmp_path):
    # The rejected override ids must be exactly the ids the runner sets, apart from resume, which users may change.
    grid = load_grid(_write(tmp_path, _set("overrides", {})), BUNDLE)
    run = next(run for run in plan_runs(grid) if run.method.name == "calsam")
    runner_ids = set(run_overrides(grid, run, "evaluate")) - set(run.method.overrides) - {"resume"}
    assert runner_ids == RUNNER_KEYS


@pytest.mark.parametrize("option", ["--jobs", "--threads"])
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_main_rejects_counts(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as raised:
        main(["--grid", _write(tmp_path), option, value])
    assert raised.value.code == 2
    assert f"argument {option}: must be an integer >= 1, got" in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()


def test_main_bad_grid_one_line(tmp_path, capsys):
    path = _write(tmp_path, _set("seeds", ["a"]))
    with pytest.raises(SystemExit) as raised:
        main(["--grid", path])
    error = capsys.readouterr().err
    assert raised.value.code == 2
    assert error.endswith(f": error: Grid file {path!r}: each of 'seeds' must be an integer >= 0, got 'a'.\n")
    assert error.count("\n") == 1
    assert not (tmp_path / "grid").exists()


def test_main_missing_grid_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--grid", str(tmp_path / "nope.yaml")])
    assert raised.value.code == 2
    assert "not found; pass one such as configs/grid_phantom.yaml" in capsys.readouterr().err


def test_report_only_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--grid", _write(tmp_path), "--report-only"])
    assert raised.value.code == 2
    assert "--report-only needs the grid folder" in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()


def test_report_only_empty_folder(tmp_path, caplog):
    (tmp_path / "grid").mkdir()
    assert main(["--grid", _write(tmp_path), "--report-only"]) == 1
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert "has evaluation results under" in errors[0]
    assert "run the grid without --report-only" in errors[0]
