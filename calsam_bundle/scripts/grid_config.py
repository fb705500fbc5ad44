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

from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["GridConfig", "Method", "load_grid"]

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
        raise ValueError(f"Grid file {str(path)!r}: {message}")


def _config_paths(raw, key: str, path: Path, bundle_dir: Path) -> tuple[Path, ...]:
    _require(isinstance(raw, list) and raw, path, f"{key!r} must be a non-empty list of config files, got {raw!r}.")
    files = tuple((bundle_dir / str(name)).resolve() for name in raw)
    missing = [str(f) for f in files if not f.is_file()]
    _require(not missing, path, f"{key!r} lists config files that do not exist: {missing}.")
    return files


def _methods(raw, path: Path) -> dict[str, Method]:
    _require(isinstance(raw, dict) and raw, path, f"'methods' must map method names to settings, got {raw!r}.")
    methods = {}
    for name, settings in raw.items():
        settings = settings or {}
        _require(isinstance(settings, dict), path, f"method {name!r} must be a mapping, got {settings!r}.")
        unknown = sorted(set(settings) - _METHOD_KEYS)
        _require(not unknown, path, f"method {name!r} has unknown keys {unknown}; allowed: {sorted(_METHOD_KEYS)}.")
        methods[str(name)] = Method(
            name=str(name),
            label=str(settings.get("label", name)),
            overrides=dict(settings.get("overrides") or {}),
            evaluate_overrides=dict(settings.get("evaluate_overrides") or {}),
            model_from=settings.get("model_from"),
        )
    for method in methods.values():
        source = method.model_from
        if source is None:
            continue
        _require(source in methods, path, f"method {method.name!r} has model_from {source!r}, which is not a method.")
        _require(methods[source].model_from is None, path, f"model_from {source!r} must name a method that trains.")
        _require(not method.overrides, path, f"method {method.name!r} reuses a model, so use evaluate_overrides only.")
    return methods


def _report(raw, methods: dict[str, Method], path: Path) -> dict:
    report = dict(raw or {})
    report.setdefault("baseline", next(iter(methods)))
    report.setdefault("proposed", list(methods)[-1])
    report.setdefault("comparisons", [[report["proposed"], report["baseline"]]])
    report.setdefault("reference", {})
    for key in ("baseline", "proposed"):
        _require(report[key] in methods, path, f"report {key} {report[key]!r} is not one of {list(methods)}.")
    for pair in report["comparisons"]:
        _require(
            isinstance(pair, list) and len(pair) == 2 and all(name in methods for name in pair),
            path,
            f"each report comparison must be a pair of method names from {list(methods)}, got {pair!r}.",
        )
    return report


def _corruptions(raw, path: Path) -> dict:
    corruptions = {"kinds": [], "severities": [1, 2, 3, 4, 5], "max_cases": None, "seed": 0}
    unknown = sorted(set(raw or {}) - set(corruptions))
    _require(not unknown, path, f"'corruptions' has unknown keys {unknown}; allowed: {sorted(corruptions)}.")
    corruptions.update(raw or {})
    corruptions["kinds"] = [str(kind) for kind in corruptions["kinds"] or []]
    corruptions["severities"] = [int(level) for level in corruptions["severities"]]
    return corruptions


def load_grid(path: str | Path, bundle_dir: str | Path) -> GridConfig:
    """Read a grid file and check its keys, methods, config files and report settings.

    Raises:
        FileNotFoundError: the grid file is missing.
        ValueError: a key is unknown or missing, a method reference is invalid, or a config file is missing.
    """
    path = Path(path).resolve()
    bundle_dir = Path(bundle_dir).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"Grid file {str(path)!r} not found; pass one such as configs/grid_phantom.yaml.")
    raw = yaml.safe_load(path.read_text()) or {}
    _require(isinstance(raw, dict), path, f"the file must contain a mapping, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - _TOP_KEYS)
    _require(not unknown, path, f"unknown keys {unknown}; allowed: {sorted(_TOP_KEYS)}.")
    seeds = raw.get("seeds")
    _require(isinstance(seeds, list) and seeds, path, f"'seeds' must be a non-empty list of integers, got {seeds!r}.")
    _require(len(set(seeds)) == len(seeds), path, f"'seeds' has repeated values: {seeds}.")
    methods = _methods(raw.get("methods"), path)
    return GridConfig(
        path=path,
        bundle_dir=bundle_dir,
        output_dir=(bundle_dir / str(raw.get("output_dir", "grids/" + path.stem))).resolve(),
        experiment_name=str(raw.get("experiment_name", f"calsam-{path.stem}")),
        seeds=tuple(int(seed) for seed in seeds),
        split_seed=int(raw.get("split_seed", 0)),
        network_seed=int(raw.get("network_seed", 0)),
        train_configs=_config_paths(raw.get("train_configs"), "train_configs", path, bundle_dir),
        evaluate_configs=_config_paths(raw.get("evaluate_configs"), "evaluate_configs", path, bundle_dir),
        overrides=dict(raw.get("overrides") or {}),
        corruptions=_corruptions(raw.get("corruptions"), path),
        methods=methods,
        report=_report(raw.get("report"), methods, path),
    )
