"""SAM checkpoint layouts and errors, and the decoder checkpoint round trip."""

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader

from scripts.decoder_checkpoint import DecoderCheckpoint, load_network
from scripts.network import CalSAMNet
from scripts.sam_builder import build_sam
from scripts.sam_checkpoint import load_sam_checkpoint


@pytest.fixture(scope="module")
def source_sam():
    return build_sam("small", init_seed=11)


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "module"])
def test_accepted_layouts_load_exactly(tmp_path, source_sam, layout):
    state = source_sam.state_dict()
    content = {
        "plain": state,
        "model": {"model": state, "epoch": 3},
        "state_dict": {"state_dict": state},
        "module": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    path = tmp_path / "sam.pth"
    torch.save(content, path)
    target = load_sam_checkpoint(build_sam("small", init_seed=0), path)
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key


def test_wrong_architecture_names_keys(tmp_path):
    state = build_sam("small", init_seed=0).state_dict()
    state.pop("mask_decoder.iou_token.weight")
    state["image_encoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        load_sam_checkpoint(build_sam("small"), path)
    message = str(error.value)
    assert "mask_decoder.iou_token.weight" in message
    assert "image_encoder.extra.weight" in message
    assert "variant" in message


def test_shape_mismatch_is_error(tmp_path):
    state = build_sam("small").state_dict()
    state["mask_decoder.iou_token.weight"] = torch.zeros(2, 256)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_sam_checkpoint(build_sam("small"), path)


def test_position_embedding_interpolated_for_smaller_input(tmp_path, source_sam):
    path = tmp_path / "sam256.pth"
    torch.save(source_sam.state_dict(), path)
    smaller = load_sam_checkpoint(build_sam("small", image_size=128), path)
    assert smaller.image_encoder.pos_embed.shape == (1, 8, 8, 192)
    assert torch.equal(smaller.mask_decoder.iou_token.weight, source_sam.mask_decoder.iou_token.weight)


def test_missing_file_and_pickled_code(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sam_checkpoint(build_sam("small"), tmp_path / "absent.pth")
    path = tmp_path / "not_weights.pth"
    torch.save({"model": "text only"}, path)
    with pytest.raises(ValueError, match="no state dict"):
        load_sam_checkpoint(build_sam("small"), path)


def test_official_name_with_wrong_md5(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(build_sam("small").state_dict(), path)
    with pytest.raises(ValueError, match="MD5"):
        load_sam_checkpoint(build_sam("small"), path)


def test_decoder_checkpoint_round_trip(tmp_path):
    network = CalSAMNet("small", num_regions=3, init_seed=2)
    with torch.no_grad():
        for parameter in network.sam.mask_decoder.parameters():
            parameter.add_(0.01)
    holder = DecoderCheckpoint(network, preprocessing={"label_convention": "brats2021"}, temperature=[1.5, 1.0, 2.0])
    path = tmp_path / "model.pt"
    torch.save(holder.state_dict(), path)
    rebuilt, loaded = load_network(path)
    for key, value in network.sam.mask_decoder.state_dict().items():
        assert torch.equal(rebuilt.sam.mask_decoder.state_dict()[key], value)
    assert loaded.temperature == [1.5, 1.0, 2.0]
    assert loaded.preprocessing == {"label_convention": "brats2021"}


def test_decoder_checkpoint_rejects_other_encoder(tmp_path):
    state = DecoderCheckpoint(CalSAMNet("small", init_seed=2)).state_dict()
    with pytest.raises(ValueError, match="another frozen encoder"):
        DecoderCheckpoint(CalSAMNet("small", init_seed=3)).load_state_dict(state)


def test_decoder_checkpoint_from_ddp_prefix_and_no_match(tmp_path):
    network = CalSAMNet("small", init_seed=2)
    state = DecoderCheckpoint(network).state_dict()
    state["mask_decoder"] = {f"module.{k}": v for k, v in state["mask_decoder"].items()}
    DecoderCheckpoint(CalSAMNet("small", init_seed=2)).load_state_dict(state)
    state["mask_decoder"] = {"unrelated.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="No decoder key"):
        DecoderCheckpoint(CalSAMNet("small", init_seed=2)).load_state_dict(state)


def _shifted_decoder_network() -> CalSAMNet:
    network = CalSAMNet("small", 64, None, 3, init_seed=0)
    with torch.no_grad():
        for parameter in network.sam.mask_decoder.parameters():
            parameter.add_(0.25)
    return network


def test_monai_checkpoint_loader_restores_decoder(tmp_path):
    # The way MONAI Label's training task loads models/model.pt before it fine-tunes: one object, strict=False.
    trained = _shifted_decoder_network()
    path = tmp_path / "model.pt"
    torch.save(DecoderCheckpoint(trained).state_dict(), path)
    fresh = CalSAMNet("small", 64, None, 3, init_seed=0)
    engine = Engine(lambda engine, batch: None)
    CheckpointLoader(load_path=str(path), load_dict={"model": fresh}, strict=False).attach(engine)
    engine.run([0], max_epochs=1)
    expected = trained.sam.mask_decoder.state_dict()
    for key, value in fresh.sam.mask_decoder.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_monai_checkpoint_loader_rejects_other_encoder(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(DecoderCheckpoint(_shifted_decoder_network()).state_dict(), path)
    other = CalSAMNet("small", 64, None, 3, init_seed=1)
    engine = Engine(lambda engine, batch: None)
    CheckpointLoader(load_path=str(path), load_dict={"model": other}, strict=False).attach(engine)
    with pytest.raises(ValueError, match="another frozen encoder"):
        engine.run([0], max_epochs=1)


def test_plain_state_dict_still_loads():
    trained = _shifted_decoder_network()
    fresh = CalSAMNet("small", 64, None, 3, init_seed=0)
    fresh.load_state_dict(trained.state_dict())
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
