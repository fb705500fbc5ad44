"""Pack the CalSAM bundle into a folder (and optionally a zip) ready for the MONAI model zoo.

Usage, from the repository root::

    python calsam_bundle/scripts/pack_bundle.py --output dist/ [--zip]

The packed bundle contains configs, scripts, docs, LICENSE, large_files.yml and the small files of models/. Left out
are run products and caches (``cache/``, ``eval/``, ``data/``, ``runs/``, ``models/train_state/``, ``__pycache__``,
hidden files) and
every file named in ``large_files.yml``, which users fetch with ``python -m monai.bundle download_large_files``.
Packing fails when a required file is missing or a remaining file exceeds the zoo's 25 MB limit.

The script uses only the standard library and PyYAML, so it runs as a plain file outside the ``scripts`` package.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import zipfile
from pathlib import Path

import yaml

logger = logging.getLogger("pack_bundle")

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_BYTES = 25 * 1000 * 1000
# ``train_state`` contains the resumable checkpoints of a training run (model, optimizer and trainer state, 47 MB each
# for the quickstart), which are not part of a shared model.
EXCLUDED_FOLDERS = {"cache", "eval", "data", "runs", "mlruns", "dist", "train_state", "__pycache__", ".pytest_cache"}
EXCLUDED_SUFFIXES = {".pyc", ".pyo", ".tmp"}
REQUIRED_FILES = (
    "LICENSE",
    "large_files.yml",
    "configs/metadata.json",
    "configs/inference.yaml",
    "configs/train.yaml",
    "configs/logging.conf",
    "docs/README.md",
)


def large_file_paths(bundle: Path) -> set[str]:
    """Bundle-relative paths listed in ``large_files.yml``."""
    listing = bundle / "large_files.yml"
    if not listing.is_file():
        return set()
    content = yaml.safe_load(listing.read_text()) or {}
    return {str(Path(entry["path"])) for entry in content.get("large_files", [])}


def select_files(bundle: Path) -> list[Path]:
    """Return the bundle-relative files that belong in the zoo package, sorted.

    Raises:
        FileNotFoundError: a required file is missing.
        ValueError: a selected file is larger than 25 MB.
    """
    missing = [name for name in REQUIRED_FILES if not (bundle / name).is_file()]
    if missing:
        raise FileNotFoundError(f"Bundle {bundle} lacks required files {missing}; add them before packing.")
    skipped_large = large_file_paths(bundle)
    selected, oversized = [], []
    for path in sorted(bundle.rglob("*")):
        relative = path.relative_to(bundle)
        if not path.is_file() or any(part in EXCLUDED_FOLDERS or part.startswith(".") for part in relative.parts):
            continue
        if path.suffix in EXCLUDED_SUFFIXES or str(relative) in skipped_large:
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            oversized.append(f"{relative} ({path.stat().st_size / 1e6:.1f} MB)")
        selected.append(relative)
    if oversized:
        raise ValueError(
            f"Files over the model zoo's 25 MB limit: {oversized}. Host them and list them in large_files.yml "
            "with url, hash_val and hash_type, or remove them."
        )
    return selected


def pack(bundle: Path, output: Path, name: str = "calsam_bundle", make_zip: bool = False) -> Path:
    """Copy the selected files to ``output/name`` (replacing an earlier pack) and optionally zip that folder.

    Returns:
        The packed folder, or the zip file when ``make_zip`` is set.

    Raises:
        FileExistsError: ``output/name`` exists but is not an earlier pack (it has no configs/metadata.json).
    """
    files = select_files(bundle)
    target = output / name
    if target.exists():
        if not (target / "configs" / "metadata.json").is_file():
            raise FileExistsError(f"{target} exists and is not a packed bundle; choose another --output.")
        shutil.rmtree(target)
    for relative in files:
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle / relative, destination)
    total = sum((target / relative).stat().st_size for relative in files)
    logger.info("Packed %d files (%.1f MB) into %s.", len(files), total / 1e6, target)
    if not make_zip:
        return target
    version = json.loads((bundle / "configs" / "metadata.json").read_text()).get("version", "0")
    archive = output / f"{name}_v{version}.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as stream:
        for relative in files:
            stream.write(target / relative, arcname=str(Path(name) / relative))
    logger.info("Wrote %s.", archive)
    return archive


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description="Pack the CalSAM bundle for the MONAI model zoo.")
    parser.add_argument("--bundle", default=str(BUNDLE_ROOT), help="Bundle folder to pack (default: this bundle).")
    parser.add_argument("--output", required=True, help="Folder that receives the packed bundle, e.g. dist/.")
    parser.add_argument("--name", default="calsam_bundle", help="Folder name of the packed bundle.")
    parser.add_argument("--zip", action="store_true", help="Also write <output>/<name>_v<version>.zip.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        pack(Path(args.bundle), Path(args.output), args.name, args.zip)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        logger.error("Packing failed: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
