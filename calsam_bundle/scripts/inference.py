"""Batch inference on new volumes: segmentation in the data set's label codes, probabilities and uncertainty.

For each case the run writes, next to each other in ``output_dir``:

- ``<case>_seg.nii.gz``: integer label map in the convention's codes (BraTS 2021: ET -> 4, TC without ET -> 1,
  WT without TC -> 2; binary: 1), from region probabilities thresholded at 0.5;
- ``<case>_prob.nii.gz``: float32 region probabilities in [0, 1], a 4D NIfTI ``(H, W, D, K)`` with the regions
  in the sidecar's ``region_names`` order;
- ``<case>_entropy.nii.gz``: float32 predictive entropy of each region's Bernoulli distribution in nats
  (0 to ln 2 = 0.693), a 4D NIfTI ``(H, W, D, K)``;
- ``<case>.json``: the sidecar with the prompt mode, model SHA-256, temperature and decoded slices.

Every NIfTI output has the input's shape, affine and qform/sform codes. A case that fails (unreadable file,
missing prompts) is logged and listed in ``inference_summary.json``, and the other cases still run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import torch

from .cases import load_case
from .label_codes import regions_to_label
from .prompt_files import automatic_prompts, prompts_from_regions, read_prompt_file
from .volume_network import CalSAMVolumeNet
from .volume_prediction import bernoulli_entropy
from .volume_writer import reference_geometry, write_json, write_nifti_like

logger = logging.getLogger(__name__)

MODES = ("prompt_file", "label", "automatic")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _strip_nifti_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_inputs(input_path: str | Path, datalist_section: str = "testing") -> list[dict]:
    """List inference items from a folder of NIfTI files or an MSD-style datalist.

    A folder gives one case per ``.nii``/``.nii.gz`` file, its case id the file name without extension. A
    datalist section may hold image paths or objects with ``image`` (one path or a list of channel files),
    optional ``label`` and ``case_id``. Relative paths are resolved against the datalist's folder.

    Raises:
        FileNotFoundError: ``input_path`` does not exist.
        ValueError: the datalist lacks the section or an entry lacks ``image``.
    """
    path = Path(input_path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
        return [{"image": str(p), "case_id": _strip_nifti_suffix(p.name)} for p in files]
    if not path.is_file():
        raise FileNotFoundError(f"Inference input {str(path)!r} not found; pass a folder of NIfTI files or a datalist.")
    content = json.loads(path.read_text())
    if datalist_section not in content:
        raise ValueError(
            f"Datalist {str(path)!r} has no section {datalist_section!r} (found {sorted(content)}); "
            "set datalist_section."
        )
    items = []
    for position, entry in enumerate(content[datalist_section]):
        item = {"image": entry} if isinstance(entry, str | list) else dict(entry)
        if "image" not in item:
            raise ValueError(f"Entry {position} of {str(path)!r} section {datalist_section!r} has no 'image': {entry}.")
        for key in ("image", "label", "brain_mask"):
            if item.get(key):
                item[key] = _resolve(item[key], path.parent)
        first = item["image"][0] if isinstance(item["image"], list) else item["image"]
        item.setdefault("case_id", _strip_nifti_suffix(Path(first).name))
        items.append(item)
    return items


def _resolve(value, folder: Path):
    if isinstance(value, list):
        return [_resolve(v, folder) for v in value]
    return str(value if Path(value).is_absolute() else folder / value)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _label_dtype(item: dict) -> np.dtype:
    """On-disk dtype of the case's label file, so a label-prompted output keeps it; uint8 otherwise."""
    if item.get("label"):
        return np.dtype(nib.load(item["label"]).get_data_dtype())
    return np.dtype(np.uint8)


class CaseInference:
    """Run one prompt mode over cases and write their outputs.

    Args:
        network: the ``CalSAMVolumeNet`` loaded from ``model_path``.
        output_dir: folder for the outputs; created if missing.
        mode: ``prompt_file`` (prompts from ``prompt_file``), ``label`` (tight boxes of the case's label file on
            every slice and region where it is present) or ``automatic`` (no prompt, every brain slice).
        model_path: the checkpoint file, hashed into every sidecar.
        prompt_file: JSON prompts (format in ``prompt_files``), required in ``prompt_file`` mode.
        threshold: probability from which a voxel belongs to a region in the label map.
    """

    def __init__(
        self,
        network: CalSAMVolumeNet,
        output_dir: str | Path,
        mode: str,
        model_path: str | Path,
        prompt_file: str | Path | None = None,
        threshold: float = 0.5,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"Unknown prompt mode {mode!r}; choose one of {MODES}.")
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"Model checkpoint {str(model_path)!r} not found; train first or set model_path.")
        self.network = network
        self.output_dir = Path(output_dir)
        self.mode = mode
        self.threshold = float(threshold)
        self.model_info = {
            "path": str(model_path),
            "sha256": file_sha256(model_path),
            "network": dict(network.network.settings),
            "encoder_sha256": network.network.encoder_sha256,
        }
        self.prompt_file = str(prompt_file) if prompt_file else None
        self.prompt_table = None
        if mode == "prompt_file":
            if not prompt_file:
                raise ValueError("Prompt mode 'prompt_file' needs prompt_file=<JSON path>.")
            self.prompt_table = read_prompt_file(prompt_file, network.region_names)

    def _prompts(self, item: dict, case: dict) -> tuple[list, str | None]:
        if self.mode == "prompt_file":
            if item["case_id"] not in self.prompt_table:
                raise ValueError(
                    f"Prompt file {self.prompt_file!r} has no prompts for case {item['case_id']!r}; "
                    f"its cases are {sorted(self.prompt_table)[:10]}."
                )
            return self.prompt_table[item["case_id"]], self.prompt_file
        if self.mode == "label":
            if "regions" not in case:
                raise ValueError(f"Case {item['case_id']!r} has no 'label' file, which prompt mode 'label' needs.")
            return prompts_from_regions(case["regions"]), item["label"]
        return automatic_prompts(case["brain"], self.network.num_regions), None

    def run_case(self, item: dict) -> dict:
        """Predict one case, write its outputs and return its sidecar content."""
        started = time.perf_counter()
        case_id = item["case_id"]
        loadable = dict(item) if self.mode == "label" else {k: v for k, v in item.items() if k != "label"}
        case = load_case(loadable, self.network.convention.name)
        first_image = item["image"][0] if isinstance(item["image"], list) else item["image"]
        geometry = reference_geometry(first_image)
        if tuple(case["image"].shape[1:]) != geometry["shape"]:
            raise ValueError(
                f"Image {first_image!r} loads as {tuple(case['image'].shape[1:])} but its header gives shape "
                f"{geometry['shape']}; store channels on the 4th axis."
            )
        prompts, prompt_source = self._prompts(item, case)
        result = self.network.predict(case["image"], prompts, brain=case["brain"])
        prob = result["prob"]
        label = regions_to_label(prob >= self.threshold, self.network.convention, dtype=torch.int64)

        label_dtype = _label_dtype(loadable)
        channels_last = prob.permute(1, 2, 3, 0).numpy()
        outputs = {
            "segmentation": write_nifti_like(
                label.numpy(), geometry, self.output_dir / f"{case_id}_seg.nii.gz", label_dtype
            ),
            "probabilities": write_nifti_like(channels_last, geometry, self.output_dir / f"{case_id}_prob.nii.gz"),
            "uncertainty": write_nifti_like(
                bernoulli_entropy(prob).permute(1, 2, 3, 0).numpy(),
                geometry,
                self.output_dir / f"{case_id}_entropy.nii.gz",
            ),
        }
        region_names = list(self.network.region_names)
        temperature = self.network.temperature
        sidecar = {
            "case_id": case_id,
            "images": item["image"],
            "shape": list(geometry["shape"]),
            "mode": self.mode,
            "prompt_source": prompt_source,
            "prompted_pairs": len(prompts),
            "decoded_slices": {
                name: result["decoded"][k].nonzero().flatten().tolist() for k, name in enumerate(region_names)
            },
            "model": self.model_info,
            "temperature": temperature,
            "temperature_applied": bool(temperature is not None and self.network.apply_temperature),
            "label_convention": self.network.convention.name,
            "region_names": region_names,
            "threshold": self.threshold,
            "outputs": {key: path.name for key, path in outputs.items()},
            "segmentation_dtype": str(label_dtype),
            "probability_layout": "4D NIfTI (H, W, D, K), regions in region_names order",
            "uncertainty_unit": "nats (Bernoulli entropy per region, maximum ln 2 at p = 0.5)",
            "unprompted_voxels": "probability 0 and entropy 0 on slices not listed in decoded_slices",
            "software": {"monai": monai.__version__, "torch": torch.__version__},
        }
        write_json(sidecar, self.output_dir / f"{case_id}.json")
        logger.info(
            "Case %s: %d prompted pairs (%s mode) decoded in %.1f s; outputs in %s.",
            case_id,
            len(prompts),
            self.mode,
            time.perf_counter() - started,
            self.output_dir,
        )
        return sidecar

    def run(self, items: list[dict]) -> dict:
        """Run every item; a failing case is logged, listed under ``failed`` and skipped."""
        completed, failed = [], []
        for item in items:
            try:
                self.run_case(item)
                completed.append(item["case_id"])
            # Any error of one input (nibabel, MONAI, prompt checks) must not stop the other cases.
            except Exception as error:
                logger.error("Case %s (%s) failed and was skipped: %s", item.get("case_id"), item.get("image"), error)
                failed.append({"case_id": item.get("case_id"), "image": item.get("image"), "error": str(error)})
        summary = {"mode": self.mode, "model": self.model_info, "completed": completed, "failed": failed}
        write_json(summary, self.output_dir / "inference_summary.json")
        logger.info(
            "Inference finished: %d cases written, %d failed; summary in %s.",
            len(completed),
            len(failed),
            self.output_dir / "inference_summary.json",
        )
        return summary


def run_inference(
    network: CalSAMVolumeNet,
    input_path: str | Path,
    output_dir: str | Path,
    mode: str,
    model_path: str | Path,
    prompt_file: str | Path | None = None,
    datalist_section: str = "testing",
    threshold: float = 0.5,
) -> dict:
    """Find the inputs, run ``CaseInference`` over them and return the summary (the bundle's ``inference``)."""
    items = find_inputs(input_path, datalist_section)
    logger.info("Inference on %d cases from %s in %s mode.", len(items), input_path, mode)
    runner = CaseInference(network, output_dir, mode, model_path, prompt_file=prompt_file, threshold=threshold)
    return runner.run(items)
