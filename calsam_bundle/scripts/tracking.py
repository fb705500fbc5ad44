"""MLflow helpers: the tracking URI inside the bundle, loss terms per iteration, parameters and the merged config.

MONAI's ``MLFlowHandler`` starts the run and logs metrics; these helpers supply what it does not log by default:
the loss weights, the data profile and the merged configuration of the run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .atomic_files import temporary_sibling

logger = logging.getLogger(__name__)

LOSS_TERMS = ("loss", "seg_loss", "fip", "fip_weight", "cmp", "cmp_weight")


def tracking_uri(output_dir: str) -> str:
    """SQLite tracking URI at ``<output_dir>/mlruns.db``; MLflow 3 rejects plain folders (``file://`` stores)."""
    folder = Path(output_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlruns.db'}"


def artifact_location(output_dir: str) -> str:
    """Folder for run artifacts next to the tracking database."""
    folder = Path(output_dir).resolve() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()


def loss_terms(output: dict) -> dict[str, float]:
    """Scalar loss terms of one training iteration, for per-iteration logging; missing terms are omitted."""
    terms = {}
    for name in LOSS_TERMS:
        value = output.get(name)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            terms[name] = float(value.detach())
        elif isinstance(value, int | float):
            terms[name] = float(value)
    return terms


def data_profile(split: dict[str, list[dict]], cases: dict[str, list[dict]] | None = None) -> dict[str, object]:
    """Flat summary of the data of a run: cases and domains per split, and embedded slices per prepared split."""
    profile: dict[str, object] = {}
    for name, items in split.items():
        profile[f"data/{name}/cases"] = len(items)
        profile[f"data/{name}/domains"] = ",".join(sorted({str(item.get("domain", "unknown")) for item in items}))
    for name, prepared in (cases or {}).items():
        profile[f"data/{name}/embedded_slices"] = sum(len(case["slice_index"]) for case in prepared)
        profile[f"data/{name}/prompted_pairs"] = sum(int(case["valid"].sum()) for case in prepared)
        if prepared:
            profile[f"data/{name}/spacing_mm"] = ",".join(f"{v:.3g}" for v in prepared[0]["spacing"])
            profile[f"data/{name}/shape"] = ",".join(str(v) for v in prepared[0]["shape"])
    return profile


def run_parameters(**groups: dict) -> dict[str, object]:
    """Flatten named groups of settings into ``group/key`` MLflow parameters."""
    flat: dict[str, object] = {}
    for group, values in groups.items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{group}/{key}"] = value
        else:
            flat[group] = values
    return flat


def write_json_atomic(content: dict, path: str | Path) -> str:
    """Write JSON to a temporary file in the same folder and rename it, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = temporary_sibling(path)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(content, stream, indent=2, default=str)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return str(path)


def write_merged_config(output_path: str | Path, argv: list[str] | None = None) -> str | None:
    """Write the merged configuration of the running ``monai.bundle run`` command, for the MLflow artifacts.

    The config files and overrides are read back from the command line, because a bundle config cannot refer to
    the parser that reads it. Returns the written path, or ``None`` (with a warning) when the command line has
    no ``--config_file``, as when a workflow is built from Python.
    """
    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if "--config_file" not in argv:
        logger.warning("No --config_file on the command line; the merged config is not saved.")
        return None
    files = argv[argv.index("--config_file") + 1]
    parser = ConfigParser()
    parser.read_config(_config_files(files))
    overrides = {}
    for position, word in enumerate(argv):
        if word.startswith("--") and word[2:] not in ("config_file", "meta_file", "logging_file", "tracking"):
            if position + 1 < len(argv) and not argv[position + 1].startswith("--"):
                overrides[word[2:]] = argv[position + 1]
    parser.update(overrides)
    return write_json_atomic({"config": parser.get(), "overrides": overrides}, output_path)


def _config_files(value: str) -> list[str]:
    text = value.strip()
    if text.startswith("["):
        return [part.strip().strip("'\"") for part in text.strip("[]").split(",") if part.strip()]
    return [text]


def run_name(workflow: str, variant: str) -> str:
    """Unique run name such as ``train-vit_b-20261204-203000``; MLFlowHandler resumes a running run of equal name."""
    return f"{workflow}-{variant}-{time.strftime('%Y%m%d-%H%M%S')}"
