"""The entries a training run reads: the datalist's domain split, or lists given directly in the config.

By default ``train#dataset#data`` and ``validate#dataset#data`` are the ``train`` and ``val`` parts of the
datalist's subject-level domain split. A caller may replace either list with its own entries
(``{"image": ..., "label": ...}``), as MONAI Label's bundle training task does with its datastore. Those entries
carry no domain and no subject, so they are used as given: all of them are source-domain data, and no domain
split is applied to them.

``DatalistSplit`` reads the datalist only when a part of the split is first requested, so a run whose entries
are all given never opens the datalist file.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from .cases import case_id_from_image, load_datalist
from .splits import domain_split


class DatalistSplit:
    """A datalist file and its subject-level domain split, both read on first use.

    Args:
        datalist: path of the MSD-style datalist JSON.
        source_domains, domain_key, val_fraction, test_fraction, seed: passed to ``splits.domain_split``.
    """

    def __init__(
        self,
        datalist: str | Path,
        source_domains: list[str],
        *,
        domain_key: str = "domain",
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        self.datalist = datalist
        self.source_domains = list(source_domains)
        self.domain_key = domain_key
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed

    @cached_property
    def items(self) -> list[dict]:
        """Every entry of the datalist, with paths resolved against its folder."""
        return load_datalist(self.datalist)

    @cached_property
    def parts(self) -> dict[str, list[dict]]:
        """The split: ``train``, ``val``, ``test_source`` and ``test_target`` lists of datalist entries."""
        return domain_split(
            self.items,
            self.source_domains,
            domain_key=self.domain_key,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            seed=self.seed,
        )

    @property
    def loaded(self) -> bool:
        """Whether this run has read the datalist."""
        return "items" in self.__dict__


def run_entries(entries: list[dict], key: str) -> list[dict]:
    """Check the entries of one config key and give each a ``case_id``.

    Entries from the datalist already have a ``case_id`` and are returned unchanged. Given entries get one from
    the name of their (first) image file, so that logs, checks and reports can name them.

    Args:
        entries: the value of ``key``, a list of dicts with at least ``image``.
        key: the config key the entries come from, for error messages (``train#dataset#data``, ...).

    Raises:
        ValueError: the list is empty, or an entry is not a dict with an ``image``.
    """
    if not isinstance(entries, list | tuple):
        raise ValueError(
            f"{key} must be a list of {{'image': ..., 'label': ...}} entries, got {type(entries).__name__}."
        )
    if not entries:
        raise ValueError(
            f"{key} is empty, but the run needs at least one case there. MONAI Label fills it from its labelled "
            "images, split by the request's val_split, which must lie between 0 and 1. A datalist fills it from the "
            "source-domain subjects of its split (see source_domains, val_fraction and test_fraction)."
        )
    checked = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("image"):
            raise ValueError(
                f"Entry {position} of {key} has no 'image'. Each entry needs 'image' and 'label', got {entry}."
            )
        if "case_id" in entry:
            checked.append(entry)
        else:
            checked.append({**entry, "case_id": case_id_from_image(entry["image"], position)})
    return checked


def entries_to_check(train: list[dict], val: list[dict], split: DatalistSplit) -> list[dict]:
    """Entries that ``initialize`` checks before any heavy work.

    When the run reads the datalist, this is every datalist entry (test entries included, so that a broken test
    file stops training rather than the evaluation that follows it), plus any given entry not in the datalist.
    When all entries are given, only they are checked and the datalist file is not opened.
    """
    config_entries = run_entries(train, "train#dataset#data") + run_entries(val, "validate#dataset#data")
    if not split.loaded:
        return _unique(config_entries)
    return _unique(split.items + config_entries)


def profile_parts(train: list[dict], val: list[dict], split: DatalistSplit) -> dict[str, list[dict]]:
    """Named entry lists for the run's data profile: the whole split when the run reads the datalist.

    The ``train`` and ``val`` lists are always the run's own, so a list given in the config replaces that part.
    """
    parts = dict(split.parts) if split.loaded else {}
    parts["train"] = run_entries(train, "train#dataset#data")
    parts["val"] = run_entries(val, "validate#dataset#data")
    return parts


def _unique(entries: list[dict]) -> list[dict]:
    """Drop repeated entries (same case and image files), keeping the first."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for entry in entries:
        identity = (str(entry.get("case_id")), repr(entry["image"]))
        if identity not in seen:
            seen.add(identity)
            unique.append(entry)
    return unique
