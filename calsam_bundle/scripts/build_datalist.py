"""Write an MSD-style datalist for a BraTS or ATLAS v2.0 folder.

Usage, from the repository root::

    python calsam_bundle/scripts/build_datalist.py brats /data/brats2021 --output /data/brats2021/datalist.json \
        --domains-csv scanners.csv --domain-column scanner
    python calsam_bundle/scripts/build_datalist.py atlas /data/ATLAS_2 --output /data/ATLAS_2/datalist.json

The datalist is written atomically, with paths relative to its folder. The script prints the case and domain
counts and the training overrides that match the data (label convention, domain key, channels).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: make the bundle's ``scripts`` package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.cases import load_datalist  # noqa: E402
from scripts.datalist_builders import (  # noqa: E402
    DatalistBuildError,
    build_atlas_datalist,
    build_brats_datalist,
    write_datalist,
)
from scripts.datalist_checks import DatalistError, check_datalist  # noqa: E402

logger = logging.getLogger("build_datalist")

BUILDERS = {"brats": build_brats_datalist, "atlas": build_atlas_datalist}


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout", choices=sorted(BUILDERS), help="folder layout: BraTS 2021/2023 or ATLAS v2.0")
    parser.add_argument("root", help="data set folder (BraTS: the folder of case folders; ATLAS: ATLAS_2)")
    parser.add_argument("--output", required=True, help="datalist JSON file to write")
    parser.add_argument("--domains-csv", default=None, help="CSV with a header row mapping case or subject ids")
    parser.add_argument("--domain-column", default="domain", help="CSV column with the domain (scanner, site, ...)")
    parser.add_argument("--id-column", default=None, help="CSV column with the ids (default: the first column)")
    parser.add_argument(
        "--skip-unmatched",
        action="store_true",
        help="leave out cases without a CSV row and ignore rows without a case, with a warning, instead of failing",
    )
    parser.add_argument("--no-labels", action="store_true", help="accept cases without a label file (test sets)")
    parser.add_argument("--check", action="store_true", help="read every file with the datalist check before training")
    return parser.parse_args(argv)


def training_overrides(datalist: dict) -> str:
    """Return the ``monai.bundle run`` overrides that match the datalist's label convention and domain key."""
    convention = datalist["label_convention"]
    domain_key = datalist["builder"]["domain_column"] or ("site" if convention == "binary" else "domain")
    parts = [f"--label_convention {convention}", f"--domain_key {domain_key}"]
    if convention == "binary":
        parts += ['--num_regions 1 --region_names "[\'lesion\']" --image_channels "[0,0,0]"']
    return " ".join(parts)


def main(argv=None) -> None:
    """Run the command line; input errors end the process with status 2 and the error message, no traceback."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        build(args)
    except (DatalistBuildError, DatalistError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def build(args: argparse.Namespace) -> None:
    """Build, write and optionally check the datalist, then print a summary."""
    datalist = BUILDERS[args.layout](
        args.root,
        domains_csv=args.domains_csv,
        domain_column=args.domain_column,
        id_column=args.id_column,
        skip_unmatched=args.skip_unmatched,
        require_label=not args.no_labels,
    )
    output = write_datalist(datalist, args.output)
    if args.check:
        check_datalist(
            load_datalist(output),
            label_convention=datalist["label_convention"],
            require_label=not args.no_labels,
        )

    builder = datalist["builder"]
    subjects = len({entry["subject"] for entry in datalist["training"]})
    print(f"Wrote {output}: {datalist['numTraining']} case(s) of {subjects} subject(s), layout {builder['layout']}.")
    print(f"Modalities in channel order: {', '.join(datalist['modality'])}.")
    print(f"Label convention: {datalist['label_convention']}.")
    print(f"Domains: {builder['domains']}.")
    if builder["skipped"]:
        print(f"Skipped {len(builder['skipped'])} folder(s), case(s) or row(s); the warnings above list them.")
    print(f"Training overrides: --datalist {output} {training_overrides(datalist)}")


if __name__ == "__main__":
    main()
