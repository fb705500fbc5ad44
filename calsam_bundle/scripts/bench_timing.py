"""Timing helpers for the benchmark suite: interleaved rounds, paired ratios, Markdown tables, machine facts.

Every ratio in the suite compares variants measured in one process. The variants run in interleaved rounds
(each round runs every variant once, in an order rotated from round to round), so a change of machine load
during the run hits all of them alike. A ratio is the median over rounds of ``time(variant) / time(baseline)``
within the same round.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import monai
import torch

__all__ = [
    "interleaved_rounds",
    "machine_facts",
    "markdown_table",
    "median",
    "paired_ratio",
    "timed",
]


def timed(function: Callable[[], object]) -> tuple[float, float]:
    """Run ``function`` once and return ``(wall seconds, process CPU seconds)``.

    Process CPU time adds up all threads of this process, so it includes torch's intra-op threads and excludes
    time the process waited for a core that other jobs held.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_rounds(
    functions: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Time every function once per round for ``rounds`` rounds, after ``warmup`` untimed calls of each.

    The order inside a round is rotated by one position per round, so no variant always runs first (cold
    caches) or right after a particular other one.

    Returns:
        ``{name: {"wall": [seconds per round], "cpu": [seconds per round]}}``.

    Raises:
        ValueError: ``rounds`` is below 1 or ``warmup`` is negative.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}.")
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    times = {name: {"wall": [], "cpu": []} for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = timed(functions[name])
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(values)


def paired_ratio(times: dict, name: str, baseline: str, clock: str = "cpu") -> float:
    """Median over rounds of ``times[name][clock][r] / times[baseline][clock][r]``."""
    pairs = zip(times[name][clock], times[baseline][clock])
    return statistics.median(value / reference for value, reference in pairs)


def _is_number(cell: object) -> bool:
    if isinstance(cell, int | float):
        return True
    try:
        float(str(cell).replace(",", ""))
    except ValueError:
        return False
    return True


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """Format a Markdown table; columns whose cells all read as numbers are right-aligned."""
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(header))]
    align = ["---:" if is_number else "---" for is_number in numeric]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or platform.machine()
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, str]:
    """Describe the machine and software at this moment: CPU model, cores, load average, versions, date."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "load average (1, 5, 15 min)": load,
        "torch threads": str(torch.get_num_threads()),
        "gpu": gpu,
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, MONAI {monai.__version__}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
