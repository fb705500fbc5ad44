"""Inference and metric benchmarks: seconds per phantom volume for the quickstart network, and HD95 against
MONAI's ``compute_hausdorff_distance`` on a BraTS-sized volume.

The ECE comparison with MONAI's ``CalibrationErrorMetric`` lives in ``benchmark_metrics``; ``ece_table`` runs it
and returns its Markdown output.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from monai.metrics import compute_hausdorff_distance

from . import benchmark_metrics
from .bench_timing import interleaved_rounds, median, paired_ratio
from .cases import load_case
from .network import CalSAMNet
from .overlap import hausdorff95_mm
from .prompt_files import prompts_from_regions
from .volume_prediction import predict_prompted_volume, volume_to_sam_slices

IMAGE_CHANNELS = [3, 1, 2]


def benchmark_volume_inference(item: dict, network: CalSAMNet, rounds: int) -> dict:
    """Time prompted inference on one phantom volume, split into loading, scaling, encoding and decoding.

    The prompts are the tight boxes of the label on every slice and region where it is present, as in the
    bundle's ``label`` prompt mode. Every prompted slice is encoded once and every prompted pair is decoded.

    Returns:
        Median wall and CPU seconds per stage (``load``, ``scale``, ``encode``, ``predict``), where ``predict``
        is ``predict_prompted_volume`` (encoder and decoder together), plus the slice and pair counts.
    """
    case = load_case(item)
    image, brain = case["image"].as_subclass(torch.Tensor), case["brain"].as_subclass(torch.Tensor)
    prompts = prompts_from_regions(case["regions"].as_subclass(torch.Tensor))
    sam_slices = volume_to_sam_slices(image, brain, IMAGE_CHANNELS)
    slices = sorted({prompt.slice_index for prompt in prompts})
    network.eval()

    functions = {
        "load": lambda: load_case(item),
        "scale": lambda: volume_to_sam_slices(image, brain, IMAGE_CHANNELS),
        "encode": lambda: network.encode(sam_slices[..., slices].permute(3, 0, 1, 2)),
        "predict": lambda: predict_prompted_volume(network, sam_slices, prompts, network.num_regions),
    }
    times = interleaved_rounds(functions, rounds, warmup=1)
    return {
        "shape": tuple(image.shape[1:]),
        "slices": len(slices),
        "pairs": len(prompts),
        "times": {name: {clock: median(values) for clock, values in entry.items()} for name, entry in times.items()},
    }


def _two_spheres(shape: tuple[int, int, int], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction and label ``(K, H, W, D)``: spheres of radius 20 and 24 voxels whose centres are 6 voxels apart."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    centre = torch.tensor([n / 2 for n in shape]).view(3, 1, 1, 1)
    label = ((grid - centre).pow(2).sum(0) <= 24**2).expand(channels, *shape).clone()
    shifted = centre + torch.tensor([6.0, 0.0, 0.0]).view(3, 1, 1, 1)
    pred = ((grid - shifted).pow(2).sum(0) <= 20**2).expand(channels, *shape).clone()
    return pred, label


def benchmark_hd95(shape: tuple[int, int, int], channels: int, rounds: int) -> dict:
    """Time this package's HD95 and MONAI's ``compute_hausdorff_distance(percentile=95)`` on the same masks.

    Returns:
        Median wall and CPU seconds of each, the paired CPU ratio MONAI / ours, and both values per channel.
    """
    pred, label = _two_spheres(shape, channels)
    spacing = (1.0, 1.0, 1.0)

    def monai_hd95() -> torch.Tensor:
        with warnings.catch_warnings():
            # MONAI 1.6.1 warns about its own deprecated argument on every call.
            warnings.simplefilter("ignore", FutureWarning)
            return compute_hausdorff_distance(
                pred[None], label[None], include_background=True, percentile=95, spacing=spacing
            )

    functions = {"ours": lambda: hausdorff95_mm(pred, label, spacing), "monai": monai_hd95}
    times = interleaved_rounds(functions, rounds, warmup=1)
    return {
        "voxels": pred.numel(),
        "times": {name: {clock: median(values) for clock, values in entry.items()} for name, entry in times.items()},
        "cpu_ratio": paired_ratio(times, "monai", "ours", "cpu"),
        "ours_mm": hausdorff95_mm(pred, label, spacing).tolist(),
        "monai_mm": monai_hd95()[0].tolist(),
    }


def ece_table(repeats: int, threads: int | None) -> str:
    """Run ``benchmark_metrics`` (ECE vs MONAI's ``CalibrationErrorMetric``) and return its Markdown output."""
    argv = ["--repeats", str(repeats)] + (["--threads", str(threads)] if threads else [])
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        benchmark_metrics.main(argv)
    return output.getvalue().strip()
