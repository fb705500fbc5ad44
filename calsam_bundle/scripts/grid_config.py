"""Read and check a benchmark grid file: methods with their config overrides, seeds, corruptions and report settings.

A grid file is plain YAML read by ``scripts/grid.py`` (not a bundle config). Paths in it are relative to the
bundle folder. Keys:

- ``output_dir``: grid folder for runs, caches, the MLflow store and the report.
- ``experiment_name``: the MLflow experiment of every run of the grid.
- ``seeds``: run seeds (data order, prompt jitter, penalty draws). ``split_seed`` and ``network_seed`` stay
  fixed, so all runs share one split and one set of initial decoder weights.
- ``train_configs`` and ``evaluate_configs``: bundle config files, in merge order.
- ``overrides``: config overrides applied to every run, training and evaluation.
- ``corruptions``: ``kinds``, ``severities``, ``max_cases`` and ``seed`` for the corrupted target cases.
- ``methods``: name to ``label``, ``overrides`` (training and evaluation), ``evaluate_overrides`` (evaluation
  only) and ``model_from`` (evaluate the trained model of another method instead of training one).
- ``report``: ``baseline`` and ``proposed`` method names, ``comparisons`` (pairs of methods for the Wilcoxon
  tests), and ``reference`` (published numbers shown next to the table, as free text rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["RUNNER_KEYS", "GridConfig", "GridFileError", "Method", "load_grid"]

_TOP_KEYS = {
    "output_dir",
    "experiment_name",
    "seeds",
    "split_seed",
    "network_seed",
    "train_configs",
    "evaluate_configs",
    "overrides",
    "corruptions",
    "methods",
    "report",
}
_METHOD_KEYS = {"label", "overrides", "evaluate_overrides", "model_from"}
_REPORT_KEYS = {"baseline", "proposed", "comparisons", "reference"}
_REFERENCE_KEYS = {"source", "rows", "claims"}
_REFERENCE_ROW_KEYS = {"method", "target_dice", "target_hd95", "target_ece"}
_CLAIM_KEYS = {"ece_reduction_percent", "gap_reduction_percent"}
# Method names become folder names and MLflow run names, so they keep to characters that are safe in both.
_METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Config ids that scripts/grid.py sets for every run. An override of one of them would send all runs to one folder
# or one seed, so grid files may not set them.
RUNNER_KEYS = frozenset(
    {
        "output_dir",
        "ckpt_dir",
        "seed",
        "split_seed",
        "network_seed",
        "embedding_cache_dir",
        "mlflow#tracking_uri",
        "mlflow#artifact_location",
        "mlflow#experiment_name",
        "mlflow#run_name",
        "evaluation_run_name",
        "corruptions",
        "corruption_severities",
        "corruption_seed",
        "corruption_max_cases",
        "corruption_dir",
    }
)


class GridFileError(ValueError):
    """A grid file that cannot be run: invalid YAML, or a key, value or name that the runner rejects."""


@dataclass(frozen=True)
class Method:
    """One row of the results table: a name, its label and the config overrides of its runs."""

    name: str
    label: str
    overrides: dict = field(default_factory=dict)
    evaluate_overrides: dict = field(default_factory=dict)
    model_from: str | None = None


@dataclass(frozen=True)
class GridConfig:
    """A checked grid file; paths are absolute."""

    path: Path
    bundle_dir: Path
    output_dir: Path
    experiment_name: str
    seeds: tuple[int, ...]
    split_seed: int
    network_seed: int
    train_configs: tuple[Path, ...]
    evaluate_configs: tuple[Path, ...]
    overrides: dict
    corruptions: dict
    methods: dict[str, Method]
    report: dict

    @property
    def baseline(self) -> str:
        """Name of the method that relative changes and gap reductions are computed against."""
        return self.report["baseline"]

    @property
    def proposed(self) -> str:
        """Name of the method whose claims the report checks."""
        return self.report["proposed"]


def _require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise GridFileError(f"Grid file {str(path)!r}: {message}")


def _is_integer(value) -> bool:
    # YAML reads true/false as bool, a subclass of int, and a seed of True is a typo, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(value, key: str, path: Path, minimum: int) -> int:
    _require(_is_integer(value) and value >= minimum, path, f"{key} must be an integer >= {minimum}, got {value!r}.")
    return value


def _text(value, key: str, path: Path) -> str:
    _require(isinstance(value, str) and value.strip(), path, f"{key} must be a non-empty string, got {value!r}.")
    return value


def _mapping(value, key: str, path: Path) -> dict:
    """Return ``value`` as a dict; a missing or null value is an empty mapping."""
    if value is None:
        return {}
    _require(isinstance(value, dict), path, f"{key} must be a mapping of key: value lines, got {value!r}.")
    return dict(value)


def _check_keys(value: dict, allowed: set[str], key: str, path: Path) -> None:
    unknown = sorted(map(str, set(value) - allowed))
    _require(not unknown, path, f"{key} has unknown keys {unknown}; allowed: {sorted(allowed)}.")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that rejects a key repeated in one mapping; PyYAML would keep the last value without a word."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is repeated in one mapping; keep one of them", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as error:
        raise GridFileError(f"Grid file {str(path)!r} is not UTF-8 text ({error}); save it as UTF-8.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        hint = "; indent with spaces, YAML does not allow tabs" if "\\t" in problem else ""
        raise GridFileError(f"Grid file {str(path)!r} is not valid YAML{where}: {problem}{hint}.") from None
    _require(raw is not None, path, "the file is empty; copy configs/grid_phantom.yaml and edit it.")
    _require(isinstance(raw, dict), path, f"the file must contain a mapping of keys, got a {type(raw).__name__}.")
    return raw


def _seeds(raw, path: Path) -> tuple[int, ...]:
    _require(isinstance(raw, list) and raw, path, f"'seeds' must be a non-empty list of integers, got {raw!r}.")
    seeds = tuple(_integer(seed, "each of 'seeds'", path, minimum=0) for seed in raw)
    _require(len(set(seeds)) == len(seeds), path, f"'seeds' has repeated values: {list(seeds)}.")
    return seeds


def _config_paths(raw, key: str, path: Path, bundle_dir: Path) -> tuple[Path, ...]:
    _require(isinstance(raw, list) and raw, path, f"{key!r} must be a non-empty list of config files, got {raw!r}.")
    files = tuple((bundle_dir / str(name)).resolve() for name in raw)
    missing = [str(f) for f in files if not f.is_file()]
    _require(
        not missing,
        path,
        f"{key!r} lists config files that do not exist: {missing}; paths are relative to {str(bundle_dir)!r}.",
    )
    return files


def _overrides(raw, key: str, path: Path) -> dict:
    overrides = _mapping(raw, key, path)
    bad_ids = [name for name in overrides if not isinstance(name, str)]
    _require(not bad_ids, path, f"{key} ids must be strings such as 'fip#enabled', got {bad_ids}.")
    owned = sorted(
        {
            name
            for name in overrides
            for runner_key in RUNNER_KEYS
            if name.lstrip("+") == runner_key or runner_key.startswith(name.lstrip("+") + "#")
        }
    )
    _require(
        not owned,
        path,
        f"{key} sets {owned}, which scripts/grid.py sets for every run; remove them "
        "(use the grid keys output_dir, seeds, split_seed, network_seed and corruptions instead).",
    )
    return overrides


def _method(name, settings, path: Path) -> Method:
    _require(
        isinstance(name, str) and _METHOD_NAME.fullmatch(name),
        path,
        f"method name {name!r} must start with a letter or digit and contain only letters, digits, '_', '.' "
        "and '-' (quote names such as 'no' or '1', which YAML reads as a bool or a number).",
    )
    settings = _mapping(settings, f"method {name!r}", path)
    _check_keys(settings, _METHOD_KEYS, f"method {name!r}", path)
    model_from = settings.get("model_from")
    _require(
        model_from is None or isinstance(model_from, str),
        path,
        f"method {name!r} has model_from {model_from!r}; give the name of one other method.",
    )
    return Method(
        name=name,
        label=_text(settings.get("label", name), f"method {name!r} label", path),
        overrides=_overrides(settings.get("overrides"), f"method {name!r} overrides", path),
        evaluate_overrides=_overrides(settings.get("evaluate_overrides"), f"method {name!r} evaluate_overrides", path),
        model_from=model_from,
    )


def _check_model_from(method: Method, methods: dict[str, Method], path: Path) -> None:
    source = method.model_from
    _require(
        source in methods,
        path,
        f"method {method.name!r} has model_from {source!r}, which is not a method; use one of {list(methods)}.",
    )
    trainers = [name for name, other in methods.items() if other.model_from is None]
    _require(
        methods[source].model_from is None,
        path,
        f"method {method.name!r} has model_from {source!r}, which does not train a model itself; "
        f"use a method without model_from: {trainers}.",
    )
    _require(
        not method.overrides,
        path,
        f"method {method.name!r} reuses the model of {source!r}, so it is not trained; move its 'overrides' to "
        "'evaluate_overrides'.",
    )


def _methods(raw, path: Path) -> dict[str, Method]:
    _require(isinstance(raw, dict) and raw, path, f"'methods' must map method names to settings, got {raw!r}.")
    methods = {}
    for name, settings in raw.items():
        methods[name] = _method(name, settings, path)
    for method in methods.values():
        if method.model_from is not None:
            _check_model_from(method, methods, path)
    return methods


def _method_name(value, key: str, methods: dict[str, Method], path: Path) -> str:
    _require(
        isinstance(value, str) and value in methods,
        path,
        f"{key}: {value!r} is not one of the methods {list(methods)}.",
    )
    return value


def _comparisons(raw, methods: dict[str, Method], path: Path) -> list[list[str]]:
    _require(
        isinstance(raw, list),
        path,
        f"report comparisons must be a list of [method, method] pairs such as [[calsam, baseline]], got {raw!r}.",
    )
    for pair in raw:
        _require(
            isinstance(pair, list) and len(pair) == 2,
            path,
            f"each report comparison must be a [method, method] pair, got {pair!r}.",
        )
        for name in pair:
            _method_name(name, f"report comparison {pair!r}", methods, path)
        _require(pair[0] != pair[1], path, f"report comparison {pair!r} compares a method with itself.")
    return [list(pair) for pair in raw]


def _reference(raw, path: Path) -> dict:
    reference = _mapping(raw, "report reference", path)
    _check_keys(reference, _REFERENCE_KEYS, "report reference", path)
    rows = reference.get("rows") or []
    _require(isinstance(rows, list), path, f"report reference rows must be a list of mappings, got {rows!r}.")
    for row in rows:
        _check_keys(_mapping(row, "each report reference row", path), _REFERENCE_ROW_KEYS, f"row {row!r}", path)
    claims = _mapping(reference.get("claims"), "report reference claims", path)
    _check_keys(claims, _CLAIM_KEYS, "report reference claims", path)
    for key, span in claims.items():
        _require(
            isinstance(span, list)
            and len(span) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in span)
            and span[0] <= span[1],
            path,
            f"report reference claims {key} must be a [low, high] pair of numbers in percent, got {span!r}.",
        )
    return reference


def _report(raw, methods: dict[str, Method], path: Path) -> dict:
    report = _mapping(raw, "'report'", path)
    _check_keys(report, _REPORT_KEYS, "'report'", path)
    baseline = _method_name(report.get("baseline", next(iter(methods))), "report baseline", methods, path)
    proposed = _method_name(report.get("proposed", list(methods)[-1]), "report proposed", methods, path)
    # A grid of one method has nothing to compare by default.
    default_comparisons = [[proposed, baseline]] if proposed != baseline else []
    return {
        "baseline": baseline,
        "proposed": proposed,
        "comparisons": _comparisons(report.get("comparisons", default_comparisons), methods, path),
        "reference": _reference(report.get("reference"), path),
    }


def _name_list(raw, key: str, choices: tuple, path: Path) -> list:
    _require(isinstance(raw, list), path, f"{key} must be a list drawn from {list(choices)}, got {raw!r}.")
    unknown = [value for value in raw if isinstance(value, bool) or value not in choices]
    _require(not unknown, path, f"{key} has invalid values {unknown}; choose from {list(choices)}.")
    _require(len(set(raw)) == len(raw), path, f"{key} has repeated values: {raw}.")
    return list(raw)


def _corruptions(raw, path: Path) -> dict:
    # Imported here because the corruption module loads TorchIO, which only this check needs from it.
    from scripts.corruption_levels import CORRUPTIONS, SEVERITIES

    corruptions = {"kinds": [], "severities": list(SEVERITIES), "max_cases": None, "seed": 0}
    settings = _mapping(raw, "'corruptions'", path)
    _check_keys(settings, set(corruptions), "'corruptions'", path)
    corruptions.update({key: value for key, value in settings.items() if value is not None or key == "max_cases"})
    corruptions["kinds"] = _name_list(corruptions["kinds"], "corruptions kinds", CORRUPTIONS, path)
    corruptions["severities"] = _name_list(corruptions["severities"], "corruptions severities", SEVERITIES, path)
    _require(corruptions["severities"], path, f"corruptions severities is empty; choose from {list(SEVERITIES)}.")
    if corruptions["max_cases"] is not None:
        _integer(corruptions["max_cases"], "corruptions max_cases (or null for all target cases)", path, minimum=1)
    _integer(corruptions["seed"], "corruptions seed", path, minimum=0)
    return corruptions


def _check_override_ids(grid: GridConfig) -> None:
    """Raise unless every override id names a key of the bundle configs it is applied to."""
    # Imported here because MONAI takes seconds to import and the rest of this module does not need it.
    from monai.bundle import ConfigParser

    train, evaluate = ConfigParser(), ConfigParser()
    train.read_config([str(file) for file in grid.train_configs])
    evaluate.read_config([str(file) for file in grid.evaluate_configs])
    checks = [("'overrides'", grid.overrides, (train, evaluate))]
    for method in grid.methods.values():
        checks.append((f"method {method.name!r} overrides", method.overrides, (train, evaluate)))
        checks.append((f"method {method.name!r} evaluate_overrides", method.evaluate_overrides, (evaluate,)))
    for key, overrides, parsers in checks:
        # A '+' prefix merges into an existing dict or list (monai.bundle.utils.merge_kv), so the id follows it.
        unknown = [name for name in overrides if not any(name.lstrip("+") in parser for parser in parsers)]
        _require(
            not unknown,
            grid.path,
            f"{key} sets ids {unknown} that the bundle configs do not define, so the runs would ignore them; "
            "check the spelling against configs/train.yaml and configs/evaluate.yaml (nested ids use '#', "
            "as in 'fip#enabled').",
        )


def load_grid(path: str | Path, bundle_dir: str | Path) -> GridConfig:
    """Read a grid file and check its keys, values, methods, config files, override ids and report settings.

    Raises:
        FileNotFoundError: the grid file is missing.
        GridFileError: the file is not valid YAML, or a key, value, method name or config file is invalid.
    """
    path = Path(path).resolve()
    bundle_dir = Path(bundle_dir).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"Grid file {str(path)!r} not found; pass one such as configs/grid_phantom.yaml.")
    raw = _read_yaml(path)
    _check_keys(raw, _TOP_KEYS, "the file", path)
    seeds = _seeds(raw.get("seeds"), path)
    methods = _methods(raw.get("methods"), path)
    grid = GridConfig(
        path=path,
        bundle_dir=bundle_dir,
        output_dir=(bundle_dir / _text(raw.get("output_dir", "grids/" + path.stem), "'output_dir'", path)).resolve(),
        experiment_name=_text(raw.get("experiment_name", f"calsam-{path.stem}"), "'experiment_name'", path),
        seeds=seeds,
        split_seed=_integer(raw.get("split_seed", 0), "'split_seed'", path, minimum=0),
        network_seed=_integer(raw.get("network_seed", 0), "'network_seed'", path, minimum=0),
        train_configs=_config_paths(raw.get("train_configs"), "train_configs", path, bundle_dir),
        evaluate_configs=_config_paths(raw.get("evaluate_configs"), "evaluate_configs", path, bundle_dir),
        overrides=_overrides(raw.get("overrides"), "'overrides'", path),
        corruptions=_corruptions(raw.get("corruptions"), path),
        methods=methods,
        report=_report(raw.get("report"), methods, path),
    )
    _check_override_ids(grid)
    return grid
