"""Export the trained decoder of one region as TorchScript, and check the export against PyTorch.

``monai.bundle ckpt_export`` scripts the network with ``torch.jit.script``, which SAM's mask decoder does not
support, so this module traces a wrapper with a fixed input signature instead. The traced module replays the
operations recorded for one batch size ``B`` and one region; export once per region and batch size you need.

Usage, from ``calsam_bundle/``::

    python -m scripts.export --model models/model.pt --output models/decoder_tc.ts --region 0 --batch 1

NOTE: torch 2.14 marks ``torch.jit`` as deprecated in favour of ``torch.export``; the TorchScript files load
with the torch releases that still ship ``torch.jit.load``.

The encoder is not part of the export: feed it embeddings from ``CalSAMNet.encode`` and boxes already mapped
to the encoder frame with ``sam_input.boxes_to_encoder_frame``.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from .decoder_checkpoint import load_network
from .network import CalSAMNet
from .volume_writer import write_json

logger = logging.getLogger(__name__)


class DecoderExportWrapper(nn.Module):
    """Box-prompted decoder of one region: ``(B, 256, h, w)`` embeddings and ``(B, 4)`` boxes in, logits out.

    Args:
        network: the trained ``CalSAMNet``.
        region: region channel index whose mask token the wrapper reads (BraTS: 0 TC, 1 WT, 2 ET).

    The forward pass takes ``embeddings`` ``(B, 256, h, w)`` and ``boxes`` ``(B, 4)`` as ``(x0, y0, x1, y1)`` in
    the encoder input frame, and returns ``(B, 1, T/4, T/4)`` mask logits in the decoder frame.
    """

    def __init__(self, network: CalSAMNet, region: int = 0) -> None:
        super().__init__()
        if not 0 <= int(region) < network.num_regions:
            raise ValueError(f"region must be in 0..{network.num_regions - 1} for this network, got {region}.")
        self.network = network
        self.region = int(region)

    def forward(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        regions = torch.full((embeddings.shape[0],), self.region, dtype=torch.long, device=embeddings.device)
        return self.network.decode(embeddings, regions, boxes=boxes)


def example_inputs(network: CalSAMNet, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random embeddings ``(B, 256, h, w)`` and valid boxes ``(B, 4)`` in the encoder frame of ``network``."""
    generator = torch.Generator().manual_seed(seed)
    side = network.spec.embedding_size
    embeddings = torch.randn((batch, 256, side, side), generator=generator)
    corners = torch.rand((batch, 2, 2), generator=generator) * network.image_size
    low, high = corners.amin(dim=1), corners.amax(dim=1) + 1.0
    return embeddings, torch.cat([low, high], dim=1)


def trace_decoder(network: CalSAMNet, region: int = 0, batch: int = 1) -> torch.jit.ScriptModule:
    """Trace ``DecoderExportWrapper`` for one region and batch size; the network is put in eval mode."""
    wrapper = DecoderExportWrapper(network.eval(), region).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about the Python booleans of CalSAMNet.decode's per-region branch. That branch is
        # constant for a fixed region, which is what the export should record.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(wrapper, example_inputs(network, batch), check_trace=False)


def check_export(path: str | Path, network: CalSAMNet, region: int, batch: int, seed: int = 1) -> float:
    """Reload the exported file and return the largest absolute logit difference to PyTorch on new inputs."""
    loaded = torch.jit.load(str(path), map_location="cpu")
    wrapper = DecoderExportWrapper(network.eval(), region).eval()
    embeddings, boxes = example_inputs(network, batch, seed=seed)
    with torch.no_grad():
        return float((loaded(embeddings, boxes) - wrapper(embeddings, boxes)).abs().max())


def export_decoder(
    model_path: str | Path,
    output: str | Path,
    region: int = 0,
    batch: int = 1,
    sam_checkpoint: str | None = None,
    tolerance: float = 1e-4,
) -> dict:
    """Export ``model.pt``'s decoder for one region to TorchScript and verify it.

    Writes ``output`` and ``output`` + ``.json`` describing the input signature and the check.

    Raises:
        RuntimeError: the reloaded export differs from PyTorch by more than ``tolerance``.
    """
    network, holder = load_network(model_path, sam_checkpoint=sam_checkpoint)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    trace_decoder(network, region, batch).save(str(output))
    difference = check_export(output, network, region, batch)
    if difference > tolerance:
        raise RuntimeError(
            f"Exported decoder {output} differs from PyTorch by {difference:.3g} (tolerance {tolerance:.0e}); "
            "do not use it."
        )
    side = network.spec.embedding_size
    description = {
        "source": str(model_path),
        "format": "torchscript (torch.jit.trace)",
        "region": region,
        "label_convention": holder.preprocessing.get("label_convention"),
        "inputs": {"embeddings": [batch, 256, side, side], "boxes": [batch, 4]},
        "boxes_frame": f"(x0, y0, x1, y1) in the {network.image_size} px encoder input frame",
        "output": {"logits": [batch, 1, network.image_size // 4, network.image_size // 4]},
        "temperature": holder.temperature,
        "max_abs_difference": difference,
        "torch": torch.__version__,
    }
    write_json(description, output.with_name(output.name + ".json"))
    logger.info("Exported region %d decoder to %s (max difference to PyTorch %.2g).", region, output, difference)
    return description


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; run ``python -m scripts.export --help`` from the bundle folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/model.pt", help="CalSAM decoder checkpoint (model.pt).")
    parser.add_argument("--output", required=True, help="TorchScript file to write, for example models/tc.ts.")
    parser.add_argument("--region", type=int, default=0, help="Region channel index (BraTS: 0 TC, 1 WT, 2 ET).")
    parser.add_argument("--batch", type=int, default=1, help="Fixed number of (slice, prompt) pairs per call.")
    parser.add_argument("--sam-checkpoint", default=None, help="SAM checkpoint path overriding the recorded one.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    description = export_decoder(args.model, args.output, args.region, args.batch, args.sam_checkpoint)
    logger.info("Export description: %s", json.dumps(description))


if __name__ == "__main__":
    main()
