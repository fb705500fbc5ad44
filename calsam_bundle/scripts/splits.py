"""Subject-level domain splits: train and validate on source domains, test on held-out source and target cases."""

from __future__ import annotations

import random
from collections import defaultdict


def domain_split(
    items: list[dict],
    source_domains: list[str],
    *,
    domain_key: str = "domain",
    subject_key: str = "subject",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Split items into ``train``, ``val``, ``test_source`` and ``test_target`` without sharing a subject.

    Source-domain subjects are shuffled with ``seed`` and cut by the fractions (at least one subject each for
    validation and test when there are three or more subjects); every case of a target-domain subject goes
    to ``test_target``. A subject seen in a source domain is kept out of ``test_target`` so that no subject's
    anatomy is both trained on and tested on.

    Raises:
        ValueError: an item lacks ``domain_key``, no item is in a source domain, or a fraction is invalid.
    """
    if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction and test_fraction must be in [0, 1) with a sum below 1, got {val_fraction} and "
            f"{test_fraction}."
        )
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        if domain_key not in item:
            raise ValueError(f"Datalist entry {item.get('case_id')!r} has no {domain_key!r} key; add one per case.")
        by_subject[str(item.get(subject_key, item.get("case_id")))].append(item)

    source_subjects = sorted(
        s for s, cases in by_subject.items() if any(c[domain_key] in source_domains for c in cases)
    )
    if not source_subjects:
        domains = sorted({str(item[domain_key]) for item in items})
        raise ValueError(f"No case has {domain_key} in {source_domains}; the datalist has domains {domains}.")
    random.Random(seed).shuffle(source_subjects)
    n = len(source_subjects)
    n_val = max(1, round(n * val_fraction)) if n >= 3 and val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if n >= 3 and test_fraction > 0 else 0
    groups = {
        "val": source_subjects[:n_val],
        "test_source": source_subjects[n_val : n_val + n_test],
        "train": source_subjects[n_val + n_test :],
    }
    split: dict[str, list[dict]] = {name: [] for name in ("train", "val", "test_source", "test_target")}
    for name, subjects in groups.items():
        for subject in subjects:
            split[name].extend(c for c in by_subject[subject] if c[domain_key] in source_domains)
    seen = set(source_subjects)
    for subject, cases in sorted(by_subject.items()):
        if subject not in seen:
            split["test_target"].extend(c for c in cases if c[domain_key] not in source_domains)
    return split
