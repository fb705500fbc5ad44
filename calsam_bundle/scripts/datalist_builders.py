"""Build MSD-style datalists from a BraTS or ATLAS v2.0 folder, with domains from an optional CSV file.

The datalist is what ``scripts.cases.load_datalist`` reads. Its ``training`` entries carry ``image``, ``label``,
``case_id``, ``subject`` and the domain keys, with paths relative to the datalist's folder. ``image`` lists the
modality files in channel order t1, t1ce, t2, flair for BraTS, and the single T1w file for ATLAS. ``subject`` lets
``scripts.splits.domain_split`` keep all timepoints of a BraTS 2023 subject in one split.

Domains. BraTS publishes no per-case scanner or site, so a scanner split needs the user's CSV file: a header row,
an id column (the first column unless named) holding case ids (``BraTS2021_00000``, ``BraTS-GLI-00000-000``) or
subject ids (``BraTS-GLI-00000``, applied to all its timepoints), and the named domain column. Its value is
written under the column's name and under ``domain``, because the evaluation reports group cases by ``domain``.
Without a CSV, BraTS cases get ``domain: unknown`` and ATLAS cases get their cohort folder as ``site`` and
``domain``. Cases without a CSV row and CSV rows without a case are errors, or skipped with a warning when
``skip_unmatched`` is set.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

from .dataset_layouts import FoundCase, LayoutScan, scan_atlas, scan_brats
from .phantom_io import write_json_atomic
from .regions import get_convention

logger = logging.getLogger(__name__)

UNKNOWN_DOMAIN = "unknown"
# Entry keys that a CSV column must not overwrite.
RESERVED_KEYS = ("image", "label", "case_id", "subject", "brain_mask")
_MAX_LISTED = 30


class DatalistBuildError(ValueError):
    """Error raised when a folder or CSV cannot become a datalist; ``problems`` lists every reason found."""

    def __init__(self, problems: list[str], source: str | Path) -> None:
        self.problems = list(problems)
        listed = "\n".join(f"  - {problem}" for problem in self.problems[:_MAX_LISTED])
        more = f"\n  ... and {len(self.problems) - _MAX_LISTED} more" if len(self.problems) > _MAX_LISTED else ""
        super().__init__(
            f"Cannot build a datalist from {source}: {len(self.problems)} problem(s). Fix them and run again:\n"
            f"{listed}{more}"
        )


def read_domain_csv(path: str | Path, domain_column: str, id_column: str | None = None) -> dict[str, str]:
    """Read ``{id: domain value}`` from a CSV file with a header row.

    Raises:
        FileNotFoundError: the file is missing.
        DatalistBuildError: a column is missing, or an id is repeated with different values, or a value is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Domain CSV {str(path)!r} not found; pass the file that maps case ids to domains.")
    # utf-8-sig drops the byte-order mark that spreadsheet programs put before the first header name.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        if not header:
            raise DatalistBuildError([f"{path}: the file is empty; it needs a header row naming its columns"], path)
        id_column = id_column or header[0]
        missing = [name for name in (id_column, domain_column) if name not in header]
        if missing:
            raise DatalistBuildError(
                [f"{path}: column(s) {missing} not found in the header {header}; name existing columns"], path
            )
        mapping: dict[str, str] = {}
        problems = []
        for line, row in enumerate(reader, start=2):
            row = {(key or "").strip(): (value or "").strip() for key, value in row.items() if key is not None}
            case_id, value = row.get(id_column, ""), row.get(domain_column, "")
            if not case_id:
                continue
            if not value:
                problems.append(f"{path}, line {line}: {case_id!r} has an empty {domain_column!r} value; fill it in")
            elif mapping.get(case_id, value) != value:
                problems.append(
                    f"{path}, line {line}: {case_id!r} is listed again with {domain_column} {value!r} after "
                    f"{mapping[case_id]!r}; keep one row per id"
                )
            else:
                mapping[case_id] = value
    if problems:
        raise DatalistBuildError(problems, path)
    return mapping


def _assign_domains(
    cases: list[FoundCase], mapping: dict[str, str], csv_path: Path, column: str, skip_unmatched: bool
) -> tuple[list[FoundCase], list[str], list[str]]:
    """Return the mapped cases, the problems, and the skipped cases and rows as warning lines."""
    problems, skipped, mapped_cases = [], [], []
    for case in cases:
        # A row for the case itself wins over a row for its subject.
        if case.case_id in mapping:
            key = case.case_id
        elif case.subject in mapping:
            key = case.subject
        else:
            reason = f"{case.case_id}: no row in {csv_path} for this case or its subject {case.subject!r}"
            if skip_unmatched:
                skipped.append(f"{reason}; the case is left out")
            else:
                problems.append(f"{reason}; add a row or pass skip_unmatched (--skip-unmatched) to leave it out")
            continue
        case.keys[column] = mapping[key]
        mapped_cases.append(case)
    known_ids = {case.case_id for case in cases} | {case.subject for case in cases}
    for unused in sorted(set(mapping) - known_ids):
        reason = f"{csv_path}: the row {unused!r} matches no case folder"
        if skip_unmatched:
            skipped.append(f"{reason}; it is ignored")
        else:
            problems.append(f"{reason}; fix the id, add the case, or pass skip_unmatched (--skip-unmatched)")
    return mapped_cases, problems, skipped


def _entry(case: FoundCase, domain_column: str | None) -> dict:
    entry: dict = {"image": [str(path) for path in case.image]}
    if case.label is not None:
        entry["label"] = str(case.label)
    entry.update({"case_id": case.case_id, "subject": case.subject, **case.keys})
    entry["domain"] = case.keys.get(domain_column, case.keys.get("site", UNKNOWN_DOMAIN))
    return entry


def _build(
    scan: LayoutScan,
    root: Path,
    title: str,
    domains_csv: str | Path | None,
    domain_column: str,
    id_column: str | None,
    skip_unmatched: bool,
) -> dict:
    problems = list(scan.problems)
    skipped = list(scan.skipped)
    cases = scan.cases
    if domain_column in RESERVED_KEYS:
        problems.append(f"domain column {domain_column!r} would overwrite the entry key of that name; rename it")
    elif domains_csv is not None and not problems:
        mapping = read_domain_csv(domains_csv, domain_column, id_column)
        cases, csv_problems, csv_skipped = _assign_domains(
            cases, mapping, Path(domains_csv), domain_column, skip_unmatched
        )
        problems += csv_problems
        skipped += csv_skipped
    if not problems and not cases:
        problems.append(f"{root}: no case left to write; check the folder and the CSV ids")
    if problems:
        raise DatalistBuildError(problems, root)
    for line in skipped:
        logger.warning("Skipped %s", line)

    entries = [_entry(case, domain_column if domains_csv is not None else None) for case in cases]
    _warn_split_subjects(entries)
    convention = get_convention(scan.label_convention)
    return {
        "name": f"{title} from {root}",
        "tensorImageSize": "3D",
        "modality": list(scan.modalities),
        "labels": {str(code): name for code, name in convention.codes.items()},
        "label_convention": scan.label_convention,
        "numTraining": len(entries),
        "training": entries,
        "builder": {
            "layout": scan.naming,
            "root": str(root),
            "domains_csv": None if domains_csv is None else str(Path(domains_csv).resolve()),
            "domain_column": domain_column if domains_csv is not None else None,
            "domains": dict(sorted(Counter(entry["domain"] for entry in entries).items())),
            "skipped": skipped,
        },
    }


def _warn_split_subjects(entries: list[dict]) -> None:
    # domain_split keeps a subject's cases together, so a subject whose timepoints carry different domains
    # loses its target-domain timepoints whenever another of its timepoints is in a source domain.
    domains_by_subject: dict[str, set[str]] = defaultdict(set)
    for entry in entries:
        domains_by_subject[entry["subject"]].add(entry["domain"])
    for subject, domains in sorted(domains_by_subject.items()):
        if len(domains) > 1:
            logger.warning(
                "Subject %s has cases in several domains %s; a domain split keeps it out of the target test set "
                "whenever it is in a source domain.",
                subject,
                sorted(domains),
            )


def build_brats_datalist(
    root: str | Path,
    *,
    domains_csv: str | Path | None = None,
    domain_column: str = "domain",
    id_column: str | None = None,
    skip_unmatched: bool = False,
    require_label: bool = True,
) -> dict:
    """Build a datalist (absolute paths) from a BraTS 2021 or 2023 folder of case folders.

    The entry's ``image`` lists t1, t1ce, t2, flair (BraTS 2023: t1n, t1c, t2w, t2f) in that order, which the
    recipe's ``image_channels: [3, 1, 2]`` relies on. The datalist's ``label_convention`` is ``brats2021`` or
    ``brats2023`` by the naming found.

    Raises:
        DatalistBuildError: listing every missing file, mixed naming, CSV problem or unmatched id.
        FileNotFoundError: ``root`` or the CSV file is missing.
    """
    root = _existing_folder(root)
    scan = scan_brats(root, require_label=require_label)
    title = "BraTS 2023" if scan.naming == "brats2023" else "BraTS 2021"
    return _build(scan, root, title, domains_csv, domain_column, id_column, skip_unmatched)


def build_atlas_datalist(
    root: str | Path,
    *,
    domains_csv: str | Path | None = None,
    domain_column: str = "domain",
    id_column: str | None = None,
    skip_unmatched: bool = False,
    require_label: bool = True,
) -> dict:
    """Build a datalist (absolute paths) from an ATLAS v2.0 BIDS folder; label convention ``binary``.

    Every entry has ``site`` (the cohort folder, ``R001`` ...) and ``domain``, which equals ``site`` unless a CSV
    names another domain column. CSV ids are case ids (``sub-r001s001_ses-1``) or subjects (``sub-r001s001``).

    Raises:
        DatalistBuildError: listing every missing file, CSV problem or unmatched id.
        FileNotFoundError: ``root`` or the CSV file is missing.
    """
    root = _existing_folder(root)
    scan = scan_atlas(root, require_label=require_label)
    return _build(scan, root, "ATLAS v2.0", domains_csv, domain_column, id_column, skip_unmatched)


def _existing_folder(root: str | Path) -> Path:
    path = Path(root).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"Data set folder {str(path)!r} not found; pass the folder that contains the cases.")
    return path


def relative_datalist(datalist: dict, folder: str | Path) -> dict:
    """Return a copy of ``datalist`` whose ``image`` and ``label`` paths are relative to ``folder``."""
    folder = Path(folder).resolve()
    result = dict(datalist)
    result["training"] = []
    for entry in datalist["training"]:
        entry = dict(entry)
        entry["image"] = [os.path.relpath(path, folder) for path in entry["image"]]
        if "label" in entry:
            entry["label"] = os.path.relpath(entry["label"], folder)
        result["training"].append(entry)
    return result


def write_datalist(datalist: dict, output: str | Path) -> Path:
    """Write ``datalist`` atomically to ``output`` with paths relative to its folder; return the path."""
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(relative_datalist(datalist, output.parent), output)
    return output
