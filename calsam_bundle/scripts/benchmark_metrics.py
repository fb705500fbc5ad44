"""Time this package's ECE against MONAI's ``CalibrationErrorMetric`` on one random BraTS-sized volume.

Run from the repository root::

    python calsam_bundle/scripts/benchmark_metrics.py [--repeats 5] [--threads N]

Both implementations get the same tensors in one process, and the timings alternate between them so that
a change in machine load affects both. The script prints a Markdown table with wall-clock and process CPU
times (the minimum and the median over the repeats), the ratio MONAI / ours, the largest difference of the
ECE values, and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import monai
import numpy as np
import torch
from monai.metrics import CalibrationErrorMetric

if __package__ in (None, ""):
    # Run as a file: make the bundle's ``scripts`` package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.calibration import compute_calibration, expected_calibration_error  # noqa: E402
from scripts.voxel_sets import build_voxel_sets  # noqa: E402


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each computation (default 5)")
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155), help="H W D (default 240 240 155)")
    parser.add_argument("--channels", type=int, default=3, help="region channels K (default 3)")
    parser.add_argument("--n-bins", type=int, default=15, help="confidence bins (default 15)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser.parse_args(argv)


def _make_volume(channels: int, shape, seed: int):
    """Uniform probabilities, labels drawn from them, and a 70 x 70 x 50 prompt box per channel."""
    generator = torch.Generator().manual_seed(seed)
    h, w, d = shape
    prob = torch.rand((channels, h, w, d), generator=generator)
    label = torch.rand((channels, h, w, d), generator=generator) < prob
    box = torch.zeros((channels, h, w, d), dtype=torch.bool)
    box[:, h // 2 - 35 : h // 2 + 35, w // 2 - 35 : w // 2 + 35, d // 2 - 25 : d // 2 + 25] = True
    box_set = build_voxel_sets(label, None, box, None, names=["box"])["box"]
    return prob, label, box_set


def _time_alternating(functions: dict, repeats: int) -> dict:
    """Run every function once per round, ``repeats`` rounds; return wall and CPU seconds per name."""
    times = {name: {"wall": [], "cpu": []} for name in functions}
    for function in functions.values():
        function()  # warm-up: first-call allocations and lazy imports
    for _ in range(repeats):
        for name, function in functions.items():
            wall, cpu = time.perf_counter(), time.process_time()
            function()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def _numpy_reference_ece(confidence, correct, n_bins: int):
    """ECE per channel with float64 sums: an independent check of both implementations on the full volume."""
    values = []
    for conf, ok in zip(confidence.astype(np.float64), correct.astype(np.float64)):
        index = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
        gap = np.bincount(index, weights=conf - ok, minlength=n_bins)
        values.append(np.abs(gap).sum() / len(conf))
    return np.array(values)


def _cell(seconds: list[float]) -> str:
    return f"{1000 * min(seconds):.0f} / {1000 * statistics.median(seconds):.0f}"


def main(argv=None) -> None:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    k, (h, w, d) = args.channels, args.shape
    prob, label, box_set = _make_volume(k, args.shape, args.seed)
    flat_prob, flat_label, flat_box = prob.reshape(k, -1), label.reshape(k, -1), box_set.reshape(k, -1)
    label_float = label.float()
    # MONAI has no voxel-set argument; the box set is the same box in every channel, so gathering its voxels
    # gives one (1, K, M) input.
    box_voxels = int(flat_box[0].sum())
    monai_metric = CalibrationErrorMetric(num_bins=args.n_bins, metric_reduction="none")

    def monai_box():
        return monai_metric(flat_prob[flat_box].view(1, k, -1), label_float.reshape(k, -1)[flat_box].view(1, k, -1))

    functions = {
        "ours_volume": lambda: expected_calibration_error(flat_prob, flat_label, None, args.n_bins),
        "monai_volume": lambda: monai_metric(prob.unsqueeze(0), label_float.unsqueeze(0)),
        "ours_box": lambda: expected_calibration_error(flat_prob, flat_label, flat_box, args.n_bins),
        "monai_box": monai_box,
        "ours_all_volume": lambda: compute_calibration(flat_prob, flat_label, None, args.n_bins),
    }
    load_before = os.getloadavg()
    times = _time_alternating(functions, args.repeats)
    load_after = os.getloadavg()

    # Same quantity for both: MONAI bins what it gets against what it gets, so feed confidence and correctness.
    confidence = torch.maximum(flat_prob, 1 - flat_prob)
    correct = ((flat_prob >= 0.5) == flat_label).float()
    monai_top_label = monai_metric(confidence.unsqueeze(0), correct.unsqueeze(0))[0].double()
    ours_ece = expected_calibration_error(flat_prob, flat_label, None, args.n_bins)
    difference = (ours_ece - monai_top_label).abs().max()
    exact_ece = _numpy_reference_ece(confidence.numpy(), correct.numpy(), args.n_bins)

    voxels = k * h * w * d
    rows = [
        ("ECE, whole volume", voxels, "ours_volume", "monai_volume"),
        ("ECE, box set (MONAI: gather + metric)", k * box_voxels, "ours_box", "monai_box"),
        ("ECE + ACE + MCE + Brier + NLL + bins, whole volume", voxels, "ours_all_volume", None),
    ]
    print(f"Wall-clock and process CPU time in ms, minimum / median of {args.repeats} runs.\n")
    print("| Computation | Voxels | Ours wall | MONAI wall | Wall ratio | Ours CPU | MONAI CPU | CPU ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for title, count, ours, reference in rows:
        ours_times = times[ours]
        if reference is None:
            print(f"| {title} | {count:,} | {_cell(ours_times['wall'])} | | | {_cell(ours_times['cpu'])} | | |")
            continue
        ref_times = times[reference]
        wall_ratio = min(ref_times["wall"]) / min(ours_times["wall"])
        cpu_ratio = min(ref_times["cpu"]) / min(ours_times["cpu"])
        print(
            f"| {title} | {count:,} | {_cell(ours_times['wall'])} | {_cell(ref_times['wall'])} | {wall_ratio:.1f}x "
            f"| {_cell(ours_times['cpu'])} | {_cell(ref_times['cpu'])} | {cpu_ratio:.1f}x |"
        )
    print(f"\nLargest |ECE ours - ECE MONAI| on the same top-label input, whole volume: {difference.item():.2e}")
    print(
        "Largest difference from a float64 numpy reference (np.bincount), whole volume: ours "
        f"{np.abs(ours_ece.numpy() - exact_ece).max():.2e}, MONAI "
        f"{np.abs(monai_top_label.numpy() - exact_ece).max():.2e} (MONAI sums its bins in float32)."
    )
    print(
        f"\nMachine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} with intra-op threads: {torch.get_num_threads()}, "
        f"MONAI {monai.__version__}, Python {platform.python_version()}."
    )
    print(
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
        f"after: {', '.join(f'{v:.2f}' for v in load_after)}."
    )
    print(f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.")
    print(f"Command: python calsam_bundle/scripts/benchmark_metrics.py {' '.join(argv or sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
