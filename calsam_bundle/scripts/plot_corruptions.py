"""Plot one phantom slice under every corruption at severities 1, 3 and 5, and print the strength of every level.

Usage, from the repository root::

    python calsam_bundle/scripts/plot_corruptions.py --output calsam_bundle/docs/corruptions.png

The phantom is built under ``calsam_bundle/data/phantom`` if missing (MNI152 anatomy, simulated lesion and
scanners). The slice is the axial FLAIR slice with the largest lesion area. The printed table gives, for every level,
the mean absolute difference from the clean image over brain voxels, in units of each channel's intensity scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if __package__ in (None, ""):
    # Run as a file: make the bundle's ``scripts`` package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.cases import load_case, load_datalist  # noqa: E402
from scripts.corruption_levels import (  # noqa: E402
    CORRUPTIONS,
    SEVERITIES,
    apply_level,
    corruption_seed,
    intensity_scale,
)
from scripts.phantom import ensure_phantom  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1]
SHOWN_SEVERITIES = (1, 3, 5)
FLAIR = 3


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(BUNDLE / "docs" / "corruptions.png"), help="PNG file to write")
    parser.add_argument("--phantom-dir", default=str(BUNDLE / "data" / "phantom"), help="phantom folder")
    parser.add_argument("--case", type=int, default=0, help="index of the phantom case in its datalist")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corruption suite")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    """Write the figure and print the strength table as Markdown."""
    args = _parse_args(argv)
    items = load_datalist(ensure_phantom(args.phantom_dir, subjects_per_domain=12, resolution_mm=2, seed=0))
    item = items[args.case]
    case = load_case(item)
    image, affine, brain = case["image"], case["affine"].numpy(), case["brain"]
    scale = intensity_scale(image, brain).view(-1, 1, 1, 1)
    depth = int(case["regions"][1].flatten(0, 1).sum(dim=0).argmax())

    def show(axis, volume, title):
        axis.imshow(np.rot90(volume[FLAIR, :, :, depth].numpy()), cmap="gray", vmin=0, vmax=1.2 * float(scale[FLAIR]))
        axis.set_title(title, fontsize=7)
        axis.axis("off")

    figure, axes = plt.subplots(len(CORRUPTIONS), 1 + len(SHOWN_SEVERITIES), figsize=(5.2, 8.4))
    print("| corruption | " + " | ".join(f"severity {s}" for s in SEVERITIES) + " |")
    print("|---|" + "---|" * len(SEVERITIES))
    for row, corruption in enumerate(CORRUPTIONS):
        show(axes[row, 0], image, f"{corruption}: clean")
        differences = []
        for severity in SEVERITIES:
            seed = corruption_seed(args.seed, item["case_id"], corruption)
            corrupted = apply_level(image, affine, brain, corruption, severity, seed)
            differences.append(float(((corrupted - image).abs() / scale)[:, brain].mean()))
            if severity in SHOWN_SEVERITIES:
                show(axes[row, 1 + SHOWN_SEVERITIES.index(severity)], corrupted, f"{corruption}: severity {severity}")
        print(f"| {corruption} | " + " | ".join(f"{d:.3f}" for d in differences) + " |")
    figure.suptitle(
        f"Phantom {item['case_id']} (MNI152 anatomy, simulated lesion), FLAIR, axial slice {depth}", fontsize=8
    )
    figure.tight_layout()
    figure.savefig(args.output, dpi=90)
    print(f"\nWrote {args.output}.")


if __name__ == "__main__":
    main()
