"""Benchmark suite: every figure is a ratio of two variants measured side by side in one process.

Run from the repository root::

    python calsam_bundle/scripts/benchmark.py [--quick] [--sections cache fip fip_default epoch inference metrics]
        [--threads 1] [--output FILE]

Sections:

- ``store``: slices and MB the embedding cache holds per phantom volume, and preparing a case from a warm disk
  cache (eager and memory-mapped reads) vs encoding it, small SAM at 256 px.
- ``cache``: a ``CalSAMTrainer`` step on cached embeddings vs the same step with the frozen encoder run on the
  slab. Networks: the small SAM at 256 px (a phantom slab of 4 slices), ViT-B at 512 px (2 slices) and ViT-B at
  1024 px (1 slice, skipped with ``--quick``). Encoder-only and decoder-only inference run on the same slab.
- ``fip``: step time of each FIP estimator setting vs no FIP, small SAM at 256 px, phantom slabs of 4 slices.
- ``fip_default``: the ``fip`` block of ``configs/train.yaml`` vs no FIP with the 64 x 64 embeddings of ViT-B at
  1024 px, over blocks as long as its ``every`` period (16 x 16 with ``--quick``).
- ``epoch``: one real training epoch on phantom slabs with the FIP default of ``configs/train.yaml`` and CMP,
  split into data loading, forward, loss and penalties, backward and optimizer step; then one validation pass.
- ``inference``: seconds per phantom volume (2 mm) for the small SAM, all prompted slices.
- ``metrics``: ECE vs MONAI's ``CalibrationErrorMetric`` (``benchmark_metrics``) and HD95 vs MONAI's
  ``compute_hausdorff_distance`` on a 240 x 240 x 155 volume with 3 channels.

All networks have random weights. The script prints Markdown; ``--output`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import yaml

if __package__ in (None, ""):
    # Run as a file: make the bundle's ``scripts`` package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts import bench_inference, bench_store, bench_training  # noqa: E402
from scripts.bench_timing import machine_facts, markdown_table  # noqa: E402
from scripts.cases import load_datalist  # noqa: E402
from scripts.network import CalSAMNet  # noqa: E402
from scripts.phantom import ensure_phantom  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1]
SECTIONS = ("store", "cache", "fip", "fip_default", "epoch", "inference", "metrics")
# Keys of the train.yaml ``fip`` block that configure the schedule, not the estimator.
_SCHEDULE_KEYS = ("weight", "warmup_epochs", "start_epoch", "enabled")

logger = logging.getLogger("benchmark")


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats and no ViT-B at 1024 px: a smoke run")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="sections to run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--image-size", type=int, default=256, help="small SAM input size in px (default 256; the quickstart uses 512)"
    )
    parser.add_argument("--train-cases", type=int, default=2, help="phantom source cases for training slabs")
    parser.add_argument("--output", default=None, help="also write the Markdown to this file")
    return parser.parse_args(argv)


def fip_default() -> dict:
    """Estimator settings of the ``fip`` block in ``configs/train.yaml`` (schedule keys left out)."""
    block = yaml.safe_load((BUNDLE / "configs" / "train.yaml").read_text())["fip"]
    return {key: value for key, value in block.items() if key not in _SCHEDULE_KEYS}


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f}"


def _store_section(items: list[dict], quick: bool) -> str:
    counts = bench_store.embedded_slice_counts(items)
    header = [
        "encoder",
        "MB per slice",
        "embedded slices per volume",
        "volume depth",
        "MB per volume",
        "MB for every slice",
    ]
    sizes = markdown_table(header, bench_store.cache_size_rows(counts))
    rounds = 1 if quick else 5
    result = bench_store.benchmark_cache_read(items[0], 256, rounds)
    rows = [
        [name, f"{entry['wall']:.2f}", f"{entry['cpu']:.2f}", f"{result['cpu_ratio'][name]:.2f}"]
        for name, entry in result["times"].items()
    ]
    reads = markdown_table(["prepare_case with", "wall s", "CPU s", "CPU ratio to encoding"], rows)
    return (
        "## Embedding cache\n\n"
        f"Float16 entries for the {len(counts)} phantom volumes (2 mm); the slices with a region plus one "
        f"neighbour on each side are embedded:\n\n{sizes}\n\n"
        f"Preparing case {items[0]['case_id']} ({result['slices']} embedded slices), small SAM at 256 px, "
        f"{rounds} interleaved rounds:\n\n{reads}"
    )


def _cache_section(slab: dict, quick: bool) -> str:
    settings = [("small", 256, 4, 2 if quick else 5), ("vit_b", 512, 2, 1 if quick else 3)]
    if not quick:
        settings.append(("vit_b", 1024, 1, 2))
    rows = []
    for variant, size, slices, rounds in settings:
        part = bench_training.first_slices(slab, slices)
        result = bench_training.benchmark_cache_vs_encoder(variant, size, part, rounds)
        times = result["times"]
        rows.append(
            [
                f"{variant} at {size} px",
                result["slices"],
                result["pairs"],
                "x".join(map(str, result["embedding"])),
                _ms(times["cached step"]["cpu"]),
                _ms(times["encoder step"]["cpu"]),
                f"{result['cpu_ratio']:.1f}",
                f"{result['wall_ratio']:.1f}",
                _ms(times["encoder only"]["cpu"] / result["slices"]),
                _ms(times["decoder only"]["cpu"] / result["slices"]),
                rounds,
            ]
        )
    header = [
        "network",
        "slices",
        "pairs",
        "embedding",
        "cached step CPU ms",
        "encoder step CPU ms",
        "CPU ratio",
        "wall ratio",
        "inference encoder CPU ms/slice",
        "inference decoder CPU ms/slice",
        "rounds",
    ]
    return "## Training step: cached embeddings vs encoder every step\n\n" + markdown_table(header, rows)


def _fip_section(network: CalSAMNet, slabs: list[dict], quick: bool) -> str:
    variants = bench_training.FIP_VARIANTS
    block, rounds, large_rounds = 16, 3, 5
    if quick:
        names = {"no FIP", "no FIP, feature gradient kept", "exact", "every_k, k 8"}
        variants = [variant for variant in variants if variant[0] in names]
        block, rounds, large_rounds = 8, 1, 1
    rows = bench_training.benchmark_fip_estimators(network, slabs, rounds=rounds, block=block, variants=variants)
    ratios = {row["variant"]: row["cpu_ratio"] for row in rows}
    exact, feature_grad = ratios["exact"], ratios["no FIP, feature gradient kept"]
    table = []
    for row in rows:
        every = (row["settings"] or {}).get("every") if "every_k" in row["variant"] else None
        predicted = "" if every is None else f"{bench_training.predicted_every_k_ratio(every, exact, feature_grad):.2f}"
        table.append(
            [
                row["variant"],
                _ms(row["cpu_per_step"]),
                _ms(row["wall_per_step"]),
                f"{row['cpu_ratio']:.2f}",
                predicted,
                f"{row['wall_ratio']:.2f}",
            ]
        )
    header = ["FIP setting", "CPU ms/step", "wall ms/step", "CPU ratio to no FIP", "every_k model", "wall ratio"]
    note = (
        f"{rounds} interleaved rounds of {block} consecutive steps per setting; times are medians over rounds "
        f"and ratios medians of per-round ratios. FIP weight {bench_training.FIP_WEIGHT}, no warm-up. "
        "The every_k model is ((k - 1) * feature-gradient ratio + exact ratio) / k."
    )

    fullest = max(slabs, key=lambda slab: int(slab["valid"].sum()))
    large = bench_training.benchmark_fip_large_embeddings(fullest, rounds=large_rounds)
    large_exact = large[1]["cpu_ratio"]
    model_rows = [
        [
            k,
            f"{bench_training.predicted_every_k_ratio(k, exact, feature_grad):.3f}",
            f"{bench_training.predicted_every_k_ratio(k, large_exact, feature_grad):.3f}",
        ]
        for k in (4, 8, 10, 12, 16)
    ]
    large_text = (
        f"Same step with 64 x 64 embeddings (SAM's decoder at 1024 px, random embeddings, the slab with the most "
        f"pairs, {int(fullest['valid'].sum())} pairs): no FIP {_ms(large[0]['cpu_per_step'])} ms, exact "
        f"{_ms(large[1]['cpu_per_step'])} ms CPU per step, ratio {large_exact:.2f} ({large_rounds} rounds of one "
        "step).\n\nPredicted every_k step-time ratio:\n\n"
        + markdown_table(["k", "16 x 16 embeddings", "64 x 64 embeddings"], model_rows)
    )
    return "## FIP estimators: step time vs no FIP\n\n" + markdown_table(header, table) + f"\n\n{note}\n\n{large_text}"


def _fip_default_section(slabs: list[dict], quick: bool) -> str:
    """Time the ``fip`` default of ``configs/train.yaml`` against no FIP on the recipe's 64 x 64 embeddings."""
    settings = fip_default()
    every = int(settings["every"]) if settings["estimator"] == "every_k" else 1
    # A block of ``every`` steps computes the exact estimate once, as training does on average.
    image_size, rounds = (256, 1) if quick else (1024, 2)
    label = settings["estimator"] + (f", every {every}" if every > 1 else "")
    variants = [("no FIP", None, False), (f"train.yaml default ({label})", settings, False)]
    fullest = max(slabs, key=lambda slab: int(slab["valid"].sum()))
    rows = bench_training.benchmark_fip_large_embeddings(
        fullest, rounds, image_size=image_size, variants=variants, block=every
    )
    side = image_size // 16
    table = [
        [row["variant"], _ms(row["cpu_per_step"]), _ms(row["wall_per_step"]), f"{row['cpu_ratio']:.3f}"]
        + [f"{row['wall_ratio']:.3f}"]
        for row in rows
    ]
    header = ["FIP setting", "CPU ms/step", "wall ms/step", "CPU ratio to no FIP", "wall ratio"]
    note = (
        f"{side} x {side} embeddings, random, on the slab with {int(fullest['valid'].sum())} pairs; {rounds} "
        f"interleaved rounds of {every} consecutive steps after one warm-up round. FIP weight "
        f"{bench_training.FIP_WEIGHT}, no warm-up."
    )
    return "## Default FIP setting vs no FIP\n\n" + markdown_table(header, table) + f"\n\n{note}"


def _epoch_section(network: CalSAMNet, slabs: list[dict], val_cases: list[dict]) -> str:
    settings = fip_default()
    result = bench_training.benchmark_epoch_share(network, slabs, val_cases, settings)
    total = result["epoch_seconds"]
    rows = [
        [segment, f"{seconds:.1f}", f"{100 * seconds / total:.1f}"] for segment, seconds in result["segments"].items()
    ]
    other = total - sum(result["segments"].values())
    rows.append(["other (epoch start and end handlers)", f"{other:.1f}", f"{100 * other / total:.1f}"])
    rows.append(["training epoch", f"{total:.1f}", "100.0"])
    text = markdown_table(["segment", "wall s", "% of epoch"], rows)
    return (
        "## Epoch wall time by segment\n\n"
        f"{result['iterations']} iterations, FIP {settings} and CMP, weights at full strength.\n\n{text}\n\n"
        f"Validation of {result['validation_cases']} case(s) after the epoch: {result['validation_seconds']:.1f} s."
    )


def _inference_section(item: dict, network: CalSAMNet, quick: bool) -> str:
    result = bench_inference.benchmark_volume_inference(item, network, rounds=1 if quick else 3)
    times = result["times"]
    decode = {clock: times["predict"][clock] - times["encode"][clock] for clock in ("wall", "cpu")}
    rows = [[stage, f"{times[stage]['wall']:.2f}", f"{times[stage]['cpu']:.2f}"] for stage in ("load", "scale")]
    rows += [
        ["encode prompted slices", f"{times['encode']['wall']:.2f}", f"{times['encode']['cpu']:.2f}"],
        ["decode prompted pairs (predict minus encode)", f"{decode['wall']:.2f}", f"{decode['cpu']:.2f}"],
    ]
    total = {clock: sum(times[stage][clock] for stage in ("load", "scale", "predict")) for clock in ("wall", "cpu")}
    rows.append(["volume total", f"{total['wall']:.2f}", f"{total['cpu']:.2f}"])
    shape = " x ".join(map(str, result["shape"]))
    return (
        f"## Inference per volume, small SAM at {network.image_size} px\n\n"
        f"Phantom case {item['case_id']} ({shape} voxels at 2 mm), {result['slices']} prompted slices, "
        f"{result['pairs']} prompted (slice, region) pairs, label-box prompts.\n\n"
        + markdown_table(["stage", "wall s", "CPU s"], rows)
    )


def _metrics_section(quick: bool, threads: int) -> str:
    rounds = 1 if quick else 3
    hd95 = bench_inference.benchmark_hd95((240, 240, 155), 3, rounds)
    times = hd95["times"]
    rows = [
        [
            "HD95, 3 channels",
            f"{hd95['voxels']:,}",
            _ms(times["ours"]["cpu"]),
            _ms(times["monai"]["cpu"]),
            f"{hd95['cpu_ratio']:.2f}",
            ", ".join(f"{v:.2f}" for v in hd95["ours_mm"]),
            ", ".join(f"{v:.2f}" for v in hd95["monai_mm"]),
        ]
    ]
    header = ["computation", "voxels", "ours CPU ms", "MONAI CPU ms", "CPU ratio MONAI / ours", "ours mm", "MONAI mm"]
    return (
        "## Metrics vs MONAI\n\n### ECE (scripts/benchmark_metrics.py)\n\n"
        + bench_inference.ece_table(rounds, threads)
        + "\n\n### HD95\n\n"
        + markdown_table(header, rows)
    )


def main(argv=None) -> str:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    started = machine_facts()
    sections = []

    items = load_datalist(ensure_phantom(str(BUNDLE / "data" / "phantom")))
    source = [item for item in items if item["domain"] == "scanner_a"]
    target = [item for item in items if item["domain"] != "scanner_a"]
    network = CalSAMNet("small", args.image_size, num_regions=3, init_seed=0)
    needs_slabs = {"cache", "fip", "fip_default", "epoch"} & set(args.sections)
    slabs = []
    if needs_slabs:
        slabs = bench_training.slabs_of(bench_training.prepare_cases(source[: args.train_cases], network), 4)

    if "store" in args.sections:
        sections.append(_store_section(items, args.quick))
    if "cache" in args.sections:
        fullest = max(slabs, key=lambda slab: int(slab["valid"].sum()))
        sections.append(_cache_section(fullest, args.quick))
    if "fip" in args.sections:
        sections.append(_fip_section(network, slabs, args.quick))
    if "fip_default" in args.sections:
        sections.append(_fip_default_section(slabs, args.quick))
    if "epoch" in args.sections:
        val_cases = bench_training.prepare_cases(source[args.train_cases : args.train_cases + 1], network, True)
        sections.append(_epoch_section(network, slabs, val_cases))
    if "inference" in args.sections:
        sections.append(_inference_section(target[0], network, args.quick))
    if "metrics" in args.sections:
        sections.append(_metrics_section(args.quick, args.threads))

    finished = machine_facts()
    machine = "\n".join(f"- {key}: {value}" for key, value in started.items() if key != "load average (1, 5, 15 min)")
    load = (
        f"- load average (1, 5, 15 min): {started['load average (1, 5, 15 min)']} at the start, "
        f"{finished['load average (1, 5, 15 min)']} at the end ({finished['date']})"
    )
    command = f"- command: python calsam_bundle/scripts/benchmark.py {' '.join(argv or sys.argv[1:])}".rstrip()
    report = "\n\n".join(sections + [f"## Machine\n\n{machine}\n{load}\n{command}"]) + "\n"
    print(report)
    if args.output:
        Path(args.output).write_text(report)
    return report


if __name__ == "__main__":
    main()
