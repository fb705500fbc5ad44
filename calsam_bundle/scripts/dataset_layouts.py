"""Find the cases of a BraTS or ATLAS v2.0 folder from the file names that these releases use.

The scanners read folder and file names only and open no image. Each returns the cases found, the problems that
make the folder unusable as it is (a missing modality file, mixed namings), and the folders it left out with the
reason. The caller then raises one error that lists every problem, and warns about every skipped folder.

BraTS layouts (one folder per case directly under the root, modality order t1, t1ce, t2, flair in both):

    BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz          BraTS 2021, labels {0, 1, 2, 4}
    BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz   BraTS 2023, labels {0, 1, 2, 3}

In BraTS 2023 names the last three digits are the timepoint, so ``BraTS-GLI-00000-000`` and ``-001`` are two
cases of subject ``BraTS-GLI-00000``. The other BraTS 2023 challenges (MEN, MET, PED, SSA) use the same pattern.

ATLAS v2.0 layout (BIDS; the cohort folder ``R001`` is the acquisition site):

    [ATLAS_2/]Training/R001/sub-r001s001/ses-1/anat/
        sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz                          T1w image
        sub-r001s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz   lesion mask {0, 1}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

NIFTI_EXTENSIONS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class BratsNaming:
    """File naming of one BraTS release: case folder pattern, separator before the modality, modality names."""

    name: str
    folder_pattern: re.Pattern
    separator: str
    modalities: tuple[str, str, str, str]
    label_convention: str
    example: str

    def subject(self, case_id: str) -> str:
        """Return the subject of a case: group 1 of the folder pattern."""
        return self.folder_pattern.match(case_id).group(1)


BRATS_NAMINGS: dict[str, BratsNaming] = {
    "brats2021": BratsNaming(
        "brats2021",
        re.compile(r"^(BraTS2021_\d{5})$"),
        "_",
        ("t1", "t1ce", "t2", "flair"),
        "brats2021",
        "BraTS2021_00000/BraTS2021_00000_t1.nii.gz",
    ),
    "brats2023": BratsNaming(
        "brats2023",
        re.compile(r"^(BraTS-[A-Z]+-\d{5})-\d{3}$"),
        "-",
        ("t1n", "t1c", "t2w", "t2f"),
        "brats2023",
        "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz",
    ),
}
ATLAS_SPACE = "space-MNI152NLin2009aSym"
ATLAS_COHORT = re.compile(r"^R\d{3}$")
ATLAS_SUBJECT = re.compile(r"^sub-[A-Za-z0-9]+$")
ATLAS_SESSION = re.compile(r"^ses-[A-Za-z0-9]+$")


@dataclass
class FoundCase:
    """One case found on disk: absolute image files in channel order, the label file, and layout keys."""

    case_id: str
    subject: str
    image: list[Path]
    label: Path | None
    keys: dict[str, str] = field(default_factory=dict)


@dataclass
class LayoutScan:
    """Result of scanning a folder: the naming found, the cases, blocking problems and skipped folders."""

    naming: str
    label_convention: str
    modalities: tuple[str, ...]
    cases: list[FoundCase] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _find_nifti(folder: Path, stem: str) -> Path | None:
    for extension in NIFTI_EXTENSIONS:
        path = folder / f"{stem}{extension}"
        if path.is_file():
            return path
    return None


def _visible_folders(folder: Path) -> list[Path]:
    # Hidden folders (.git, .ipynb_checkpoints) are never data, so they are left out without a warning.
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def scan_brats(root: str | Path, require_label: bool = True) -> LayoutScan:
    """Find BraTS 2021 or 2023 case folders directly under ``root`` and their modality and label files.

    Folders that match neither naming are skipped and listed in ``skipped``. Both namings under one root are a
    problem, because they need different label conventions.
    """
    root = Path(root).resolve()
    by_naming: dict[str, list[Path]] = {name: [] for name in BRATS_NAMINGS}
    skipped = []
    for folder in _visible_folders(root):
        naming = next((n for n in BRATS_NAMINGS.values() if n.folder_pattern.match(folder.name)), None)
        if naming is None:
            skipped.append(f"{folder}: the folder name matches neither BraTS 2021 nor BraTS 2023 case naming")
        else:
            by_naming[naming.name].append(folder)

    found = [name for name, folders in by_naming.items() if folders]
    if not found:
        examples = " or ".join(n.example for n in BRATS_NAMINGS.values())
        scan = LayoutScan("unknown", "unknown", (), skipped=skipped)
        scan.problems.append(
            f"{root}: no BraTS case folder found; expected one folder per case such as {examples}. Point the "
            "builder at the folder that contains the case folders."
        )
        return scan
    if len(found) > 1:
        first = {name: by_naming[name][0] for name in found}
        scan = LayoutScan("mixed", "unknown", (), skipped=skipped)
        scan.problems.append(
            f"{root}: mixes BraTS 2021 case folders ({first['brats2021']}, {len(by_naming['brats2021'])} in all) "
            f"and BraTS 2023 case folders ({first['brats2023']}, {len(by_naming['brats2023'])} in all). The two "
            "releases code enhancing tumour differently (4 and 3); build one datalist per release from separate "
            "folders."
        )
        return scan

    naming = BRATS_NAMINGS[found[0]]
    scan = LayoutScan(naming.name, naming.label_convention, naming.modalities, skipped=skipped)
    for folder in by_naming[naming.name]:
        case_id = folder.name
        images = []
        for modality in naming.modalities:
            path = _find_nifti(folder, f"{case_id}{naming.separator}{modality}")
            if path is None:
                scan.problems.append(
                    f"{folder / f'{case_id}{naming.separator}{modality}.nii.gz'}: {modality} file not found; "
                    "restore it from the release or remove the case folder"
                )
            images.append(path)
        label = _find_nifti(folder, f"{case_id}{naming.separator}seg")
        if label is None and require_label:
            scan.problems.append(
                f"{folder / f'{case_id}{naming.separator}seg.nii.gz'}: label file not found; restore it, remove the "
                "case folder, or build without labels for a validation set"
            )
        if all(path is not None for path in images):
            scan.cases.append(FoundCase(case_id, naming.subject(case_id), images, label))
    return scan


def _atlas_cohort_root(root: Path) -> Path:
    # The release unpacks to ATLAS_2/{Training,Testing}; the Testing set has no lesion masks, so a root that
    # contains Training is read from there.
    if not any(ATLAS_COHORT.match(path.name) for path in _visible_folders(root)) and (root / "Training").is_dir():
        return root / "Training"
    return root


def scan_atlas(root: str | Path, require_label: bool = True) -> LayoutScan:
    """Find the T1w images and lesion masks of an ATLAS v2.0 BIDS folder, one case per session of a subject.

    Each case records its cohort folder (``R001`` ...) as ``site``. ``root`` is the release folder that contains
    ``Training``, or the folder that contains the cohort folders.
    """
    root = Path(root).resolve()
    cohort_root = _atlas_cohort_root(root)
    scan = LayoutScan("atlas2", "binary", ("T1w",))
    cohorts = []
    for folder in _visible_folders(cohort_root):
        if ATLAS_COHORT.match(folder.name):
            cohorts.append(folder)
        else:
            scan.skipped.append(f"{folder}: not an ATLAS cohort folder (R001, R002, ...)")
    if not cohorts:
        scan.problems.append(
            f"{root}: no ATLAS cohort folder (R001, R002, ...) found here or in {root / 'Training'}; point the "
            "builder at the ATLAS_2 folder or at its Training folder."
        )
        return scan

    for cohort in cohorts:
        for subject_folder in _visible_folders(cohort):
            if not ATLAS_SUBJECT.match(subject_folder.name):
                scan.skipped.append(f"{subject_folder}: not a BIDS subject folder (sub-<label>)")
                continue
            sessions = [path for path in _visible_folders(subject_folder) if ATLAS_SESSION.match(path.name)]
            if not sessions:
                scan.problems.append(
                    f"{subject_folder}: no session folder (ses-<label>) found; restore the subject's files or remove "
                    "the folder"
                )
            for session in sessions:
                case = _atlas_case(cohort.name, subject_folder.name, session, require_label, scan.problems)
                if case is not None:
                    scan.cases.append(case)
    return scan


def _atlas_case(site: str, subject: str, session: Path, require_label: bool, problems: list[str]) -> FoundCase | None:
    anat = session / "anat"
    prefix = f"{subject}_{session.name}_{ATLAS_SPACE}"
    image = _find_nifti(anat, f"{prefix}_T1w")
    label = _find_nifti(anat, f"{prefix}_label-L_desc-T1lesion_mask")
    if image is None:
        problems.append(
            f"{anat / f'{prefix}_T1w.nii.gz'}: T1w image not found; restore it from the release or remove the "
            "session folder"
        )
    if label is None and require_label:
        problems.append(
            f"{anat / f'{prefix}_label-L_desc-T1lesion_mask.nii.gz'}: lesion mask not found; restore it, remove the "
            "session folder, or build without labels for the Testing set"
        )
    if image is None:
        return None
    return FoundCase(f"{subject}_{session.name}", subject, [image], label, {"site": site})
