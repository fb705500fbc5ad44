"""Corrupted copies of target test cases for evaluation, each scored as its own domain.

The evaluation report groups rows by the ``domain`` of each case (``cases.load_case``). A corrupted copy gets
the domain ``"<domain>:<corruption>:<severity>"``, so ``summary.json`` and ``per_case.csv`` keep clean and
corrupted cases apart and ``grid_report`` can draw metric-against-severity curves from them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

DOMAIN_SEPARATOR = ":"
CASE_SEPARATOR = "__"

__all__ = ["CASE_SEPARATOR", "DOMAIN_SEPARATOR", "corrupted_domain", "corrupted_test_items", "parse_corrupted_domain"]


def corrupted_domain(domain: str, corruption: str, severity: int) -> str:
    """Return the report domain of a corrupted case, for example ``"scanner_b:motion:3"``."""
    return f"{domain}{DOMAIN_SEPARATOR}{corruption}{DOMAIN_SEPARATOR}{int(severity)}"


def parse_corrupted_domain(domain: str) -> tuple[str, str, int] | None:
    """Split ``"<domain>:<corruption>:<severity>"`` into its parts; return ``None`` for a clean domain."""
    parts = str(domain).rsplit(DOMAIN_SEPARATOR, 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def corrupted_test_items(
    items: list[dict],
    output_dir: str,
    corruptions: Sequence[str] = (),
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    max_cases: int | None = None,
    domain_key: str = "domain",
) -> list[dict]:
    """Write (or reuse) corrupted copies of test cases and return their datalist items with corrupted domains.

    Args:
        items: test cases of the target domains, as in ``split["test_target"]``. Only test cases may be passed,
            because a corrupted copy of a training case would leak its anatomy into the test set.
        output_dir: folder of the corrupted files, shared by all runs that use the same cases and seed.
        corruptions: names from ``scripts.corruptions.CORRUPTIONS``; empty returns ``[]`` without importing it.
        severities: levels from ``scripts.corruptions.SEVERITIES``.
        seed: corruption seed passed to ``ensure_corrupted``.
        max_cases: corrupt only the first ``max_cases`` items in ``case_id`` order; ``None`` corrupts all.
        domain_key: the datalist key whose value names the clean domain.

    Returns:
        One item per (case, corruption, severity), with ``domain`` set by ``corrupted_domain``.

    Raises:
        ValueError: ``max_cases`` is below 1.
    """
    if not corruptions:
        return []
    if max_cases is not None and int(max_cases) < 1:
        raise ValueError(f"corruption_max_cases must be null or at least 1, got {max_cases}.")
    # Imported here so that evaluation without corruptions does not need TorchIO.
    from .corruptions import ensure_corrupted

    chosen = sorted(items, key=lambda item: str(item["case_id"]))
    if max_cases is not None:
        chosen = chosen[: int(max_cases)]
    corrupted = ensure_corrupted(
        chosen, output_dir, corruptions=tuple(corruptions), severities=tuple(int(s) for s in severities), seed=seed
    )
    for item in corrupted:
        clean_domain = str(item.get(domain_key, item.get("domain", "unknown")))
        item["domain"] = corrupted_domain(clean_domain, item["corruption"], item["severity"])
    logger.info(
        "Evaluating %d corrupted copies of %d target cases: %s at severities %s, seed %d.",
        len(corrupted),
        len(chosen),
        ", ".join(corruptions),
        list(severities),
        seed,
    )
    return corrupted
