"""Embedding cache benchmarks: slices and MB per volume, and reading a volume's entries vs encoding it."""

from __future__ import annotations

import shutil
import statistics
import tempfile

import torch
from monai.transforms import LoadImage

from .bench_timing import interleaved_rounds, median, paired_ratio
from .cases import prepare_case, target_slices
from .embedding_store import EmbeddingStore
from .network import CalSAMNet
from .regions import get_convention, label_to_regions

# (name, SAM encoder input side): embedding sides 16, 32 and 64.
ENCODER_SIZES = (("small SAM at 256 px", 256), ("small SAM at 512 px", 512), ("ViT-B at 1024 px", 1024))


def embedded_slice_counts(items: list[dict], label_convention: str = "brats2021", margin: int = 1) -> list[dict]:
    """Count, per case, the slices ``cases.prepare_case`` embeds (a region present, widened by ``margin``).

    Returns:
        One dict per case with ``case_id``, ``depth`` (slices along the last axis) and ``embedded``.
    """
    loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=None)
    convention = get_convention(label_convention)
    counts = []
    for item in items:
        regions = label_to_regions(torch.as_tensor(loader(item["label"])), convention)
        counts.append(
            {
                "case_id": item["case_id"],
                "depth": int(regions.shape[-1]),
                "embedded": len(target_slices(regions, margin)),
            }
        )
    return counts


def megabytes_per_slice(image_size: int, dtype: torch.dtype = torch.float16) -> float:
    """Return the size in MB (10^6 bytes) of one ``(256, image_size / 16, image_size / 16)`` embedding."""
    side = image_size // 16
    return 256 * side * side * torch.finfo(dtype).bits / 8 / 1e6


def cache_size_rows(counts: list[dict]) -> list[list[str]]:
    """Build table rows of slices and float16 MB per volume (median, min to max) for each encoder size."""
    embedded = [count["embedded"] for count in counts]
    depth = [count["depth"] for count in counts]
    rows = []
    for name, size in ENCODER_SIZES:
        megabytes = megabytes_per_slice(size)
        rows.append(
            [
                name,
                f"{megabytes:.3f}",
                f"{statistics.median(embedded):.0f} ({min(embedded)} to {max(embedded)})",
                f"{statistics.median(depth):.0f}",
                f"{statistics.median(embedded) * megabytes:.1f} ({min(embedded) * megabytes:.1f} to "
                f"{max(embedded) * megabytes:.1f})",
                f"{statistics.median(depth) * megabytes:.1f}",
            ]
        )
    return rows


def benchmark_cache_read(item: dict, image_size: int, rounds: int) -> dict:
    """Time preparing one case with a cold store (encoding) vs a warm disk cache (eager and memory-mapped reads).

    Every function prepares the whole case, so loading and intensity scaling are in all three times and the
    differences come from the store alone.

    Returns:
        Median wall and CPU seconds per function, the paired CPU ratios to the cold store, and the slice count.
    """
    network = CalSAMNet("small", image_size, num_regions=3, init_seed=0)
    folder = tempfile.mkdtemp(prefix="calsam_cache_bench_")
    try:
        options = {"image_channels": [3, 1, 2]}
        prepared = prepare_case(item, EmbeddingStore(network, folder, progress=False), **options)

        def cold() -> None:
            prepare_case(item, EmbeddingStore(network, None, progress=False), **options)

        def disk() -> None:
            prepare_case(item, EmbeddingStore(network, folder, progress=False), **options)

        def mapped() -> None:
            case = prepare_case(item, EmbeddingStore(network, folder, memory_map=True, progress=False), **options)
            # The view reads nothing until indexed; reading every slice makes the time comparable.
            _ = case["embeddings"][:]

        functions = {"encode (cold store)": cold, "read from disk": disk, "memory-mapped view, all read": mapped}
        times = interleaved_rounds(functions, rounds, warmup=1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "slices": len(prepared["slice_index"]),
        "times": {name: {clock: median(values) for clock, values in entry.items()} for name, entry in times.items()},
        "cpu_ratio": {name: paired_ratio(times, name, "encode (cold store)", "cpu") for name in functions},
    }
