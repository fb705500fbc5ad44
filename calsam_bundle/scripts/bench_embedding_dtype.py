"""Measure how float16 embedding storage changes quickstart Dice against float32.

Runs the quickstart recipe (``configs/train.yaml`` with ``configs/quickstart.yaml``: MNI phantom, small SAM,
CPU) once per storage dtype, with the same seed and schedule. Each run's best decoder (``models/model.pt``) is
then evaluated on the held-out source and target test cases, with test embeddings stored in each dtype.
The runs train on cached embeddings (``encoder_every_step: false``, no image augmentation) even where the
quickstart encodes every step, because only then does the storage dtype reach training.
Run from the repository root::

    python calsam_bundle/scripts/bench_embedding_dtype.py [--max-epochs N] [--dtypes float32 float16]

Each run writes ``<work-dir>/<dtype>/result.json``. A run whose result file exists is not repeated unless
``--rerun`` is given, so the two runs can go to two processes and a last call prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a file: make the bundle's ``scripts`` package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.utils import set_determinism  # noqa: E402

from scripts.bench_timing import machine_facts, markdown_table  # noqa: E402
from scripts.cases import prepare_cases  # noqa: E402
from scripts.decoder_checkpoint import load_network  # noqa: E402
from scripts.embedding_store import EmbeddingStore  # noqa: E402
from scripts.evaluator import predict_volume  # noqa: E402
from scripts.overlap import dice  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16")
logger = logging.getLogger("bench_embedding_dtype")


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="storage dtypes to train")
    parser.add_argument("--max-epochs", type=int, default=None, help="epochs per run (default: quickstart's)")
    parser.add_argument("--work-dir", default=str(BUNDLE / "runs" / "embedding_dtype"), help="output folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--rerun", action="store_true", help="train again even when result.json exists")
    parser.add_argument(
        "--training-seed",
        type=int,
        default=None,
        help="seed of the data order and prompt jitter only (default: the config's seed); the split and the "
        "random encoder weights keep the config's seed. Runs go to <work-dir>/<dtype>_seed<N>.",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ID=VALUE",
        help="extra config override, VALUE read as YAML (for example fip#every=8); repeatable",
    )
    return parser.parse_args(argv)


def _config(dtype: str, run_dir: Path, max_epochs: int | None, extra: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.yaml"), str(BUNDLE / "configs" / "quickstart.yaml")])
    overrides = {
        # Training on cached embeddings, so that the storage dtype reaches the training steps too.
        "encoder_every_step": False,
        "image_augmentation": None,
        "bundle_root": str(run_dir),
        "dataset_dir": str(BUNDLE / "data" / "phantom"),
        "embedding_dtype": dtype,
        "embedding_cache_dir": str(run_dir / "cache"),
    }
    if max_epochs is not None:
        overrides["max_epochs"] = max_epochs
    overrides.update(extra)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _mean_dice(network, cases: list[dict]) -> list[float]:
    """Mean Dice per region over ``cases`` at threshold 0.5, with the BraTS empty-mask convention."""
    per_case = [dice(predict_volume(network, case)["prob"] >= 0.5, case["volume_regions"]) for case in cases]
    return torch.stack(per_case).mean(dim=0).tolist()


def train_and_evaluate(
    dtype: str, run_dir: Path, max_epochs: int | None, training_seed: int | None, extra: dict
) -> dict:
    """Train the quickstart recipe with ``dtype`` embeddings and evaluate its best decoder; return the numbers."""
    if training_seed is not None:
        extra = {**extra, "train#trainer#prompt_seed": training_seed}
    parser = _config(dtype, run_dir, max_epochs, extra)
    started = time.perf_counter()
    parser.get_parsed_content("initialize")
    if training_seed is not None:
        # After the config's set_determinism: reseeds the global RNG, which orders the training slabs.
        set_determinism(seed=training_seed)
    parser.get_parsed_content("run")
    train_seconds = time.perf_counter() - started
    evaluator = parser.get_parsed_content("validate#evaluator")
    split = parser.get_parsed_content("split")
    preprocessing = parser.get_parsed_content("preprocessing")
    trainer = parser.get_parsed_content("train#trainer")

    network, _ = load_network(run_dir / "models" / "model.pt")
    result = {
        "dtype": dtype,
        "max_epochs": parser.get_parsed_content("max_epochs"),
        "iterations": trainer.state.iteration,
        "fip": parser.get_parsed_content("fip"),
        "training_seed": parser.get_parsed_content("seed") if training_seed is None else training_seed,
        "overrides": {key: str(value) for key, value in extra.items()},
        "sam": f"{parser.get_parsed_content('sam_variant')} at {parser.get_parsed_content('sam_image_size')} px",
        "train_seconds": train_seconds,
        "best_val_mean_dice": float(evaluator.state.best_metric),
        "best_val_epoch": int(evaluator.state.best_metric_epoch),
        "test": {},
    }
    for test_dtype in DTYPES:
        store = EmbeddingStore(network, cache_dir=None, dtype=test_dtype, progress=False)
        for part in ("test_source", "test_target"):
            cases = prepare_cases(
                split[part], store, description=f"{part} ({test_dtype})", keep_volume=True, **preprocessing
            )
            result["test"][f"{part}/{test_dtype}"] = _mean_dice(network, cases)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _table(results: dict[str, dict]) -> str:
    rows = []
    for train_dtype, result in results.items():
        rows.append(
            [
                f"{train_dtype} training",
                "validation (best epoch)",
                f"{100 * result['best_val_mean_dice']:.2f}",
                "",
                "",
                "",
            ]
        )
        for key, values in result["test"].items():
            part, test_dtype = key.split("/")
            rows.append(
                [
                    f"{train_dtype} training",
                    f"{part}, {test_dtype} test embeddings",
                    f"{100 * _mean(values):.2f}",
                    *(f"{100 * v:.2f}" for v in values),
                ]
            )
    return markdown_table(["run", "cases", "mean Dice %", "TC", "WT", "ET"], rows)


def main(argv=None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    work_dir = Path(args.work_dir)
    extra = {}
    for setting in args.set:
        key, separator, value = setting.partition("=")
        if not separator:
            raise ValueError(f"--set expects ID=VALUE, for example fip#every=8, got {setting!r}.")
        extra[key] = yaml.safe_load(value)
    suffix = "" if args.training_seed is None else f"_seed{args.training_seed}"
    results = {}
    for dtype in args.dtypes:
        run_dir = work_dir / f"{dtype}{suffix}"
        result_file = run_dir / "result.json"
        if result_file.is_file() and not args.rerun:
            results[dtype] = json.loads(result_file.read_text())
            continue
        results[dtype] = train_and_evaluate(dtype, run_dir, args.max_epochs, args.training_seed, extra)
    print(_table(results))
    if set(results) == set(DTYPES):
        float32, float16 = results["float32"], results["float16"]
        val_change = 100 * (float16["best_val_mean_dice"] - float32["best_val_mean_dice"])
        print(f"\nfloat16 - float32 training, best validation mean Dice: {val_change:+.2f} points")
        for part in ("test_source", "test_target"):
            own = [_mean(r["test"][f"{part}/{d}"]) for r, d in ((float16, "float16"), (float32, "float32"))]
            print(f"float16 - float32 training, {part} mean Dice (own dtype): {100 * (own[0] - own[1]):+.2f} points")
    for dtype, result in results.items():
        print(
            f"{dtype}: {result['sam']}, {result['iterations']} iterations, {result['max_epochs']} epochs, "
            f"training seed {result.get('training_seed', 'of the config')}, FIP {result['fip']}, "
            f"{result['train_seconds']:.0f} s training"
        )
    print("\n" + "\n".join(f"- {key}: {value}" for key, value in machine_facts().items()))
    print(f"- command: python calsam_bundle/scripts/bench_embedding_dtype.py {' '.join(argv or sys.argv[1:])}")


if __name__ == "__main__":
    main()
