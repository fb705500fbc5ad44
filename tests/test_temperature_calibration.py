"""Temperature fit after training, on real prepared cases and a real checkpoint file."""

import math

import torch
from ignite.engine import Engine
from synthetic_cases import write_cases

from scripts.cases import load_datalist, prepare_cases
from scripts.decoder_checkpoint import DecoderCheckpoint, read_checkpoint
from scripts.embedding_store import EmbeddingStore
from scripts.network import CalSAMNet
from scripts.temperature_calibration import TemperatureCalibrationHandler, collect_validation_logits


def _prepared(tmp_path, network):
    items = load_datalist(write_cases(tmp_path / "data", count=2))
    store = EmbeddingStore(network, None, "float32")
    return prepare_cases(items, store, keep_volume=True)


def test_collected_voxels_stay_inside_grown_boxes(tmp_path):
    network = CalSAMNet("small", num_regions=3, init_seed=0)
    cases = _prepared(tmp_path, network)
    logits, labels, mask = collect_validation_logits(network, cases, box_margin=2)
    assert logits.shape == labels.shape == mask.shape
    assert logits.shape[0] == 3
    # Every region has prompted voxels, and padding is masked out.
    assert bool(mask.any(dim=1).all())
    assert float(logits[~mask].abs().sum()) == 0.0
    # Label voxels inside the grown boxes are a subset of the fit voxels: foreground is present for each region.
    assert bool((labels & mask).any(dim=1).all())


def test_handler_stores_temperature_in_checkpoint(tmp_path):
    network = CalSAMNet("small", num_regions=3, init_seed=0)
    cases = _prepared(tmp_path, network)
    model_path = tmp_path / "model.pt"
    torch.save(DecoderCheckpoint(network).state_dict(), model_path)
    engine = Engine(lambda engine, batch: None)
    engine.network = network
    handler = TemperatureCalibrationHandler(cases, str(model_path), box_margin=3)
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    stored = read_checkpoint(model_path)["temperature"]
    assert stored == handler.temperature
    assert len(stored) == 3
    for value in stored:
        assert math.isfinite(value)
        assert value > 0


def test_disabled_handler_leaves_checkpoint(tmp_path):
    network = CalSAMNet("small", num_regions=3, init_seed=0)
    model_path = tmp_path / "model.pt"
    torch.save(DecoderCheckpoint(network).state_dict(), model_path)
    before = model_path.read_bytes()
    engine = Engine(lambda engine, batch: None)
    engine.network = network
    TemperatureCalibrationHandler([], str(model_path), enabled=False).attach(engine)
    engine.run([0], max_epochs=1)
    assert model_path.read_bytes() == before
