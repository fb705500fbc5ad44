"""Real SAM modules: frozen encoders, batched decoding, region tokens."""

import pytest
import torch

from scripts.network import CalSAMNet


@pytest.fixture(scope="module")
def network():
    return CalSAMNet("small", num_regions=3, init_seed=0)


def test_only_decoder_parameters_train(network):
    trainable = {id(p) for p in network.trainable_parameters()}
    decoder = {id(p) for p in network.sam.mask_decoder.parameters()}
    assert trainable == decoder
    for module in (network.sam.image_encoder, network.sam.prompt_encoder):
        assert not any(p.requires_grad for p in module.parameters())


def test_encoders_bit_identical_after_weight_decay_step():
    network = CalSAMNet("small", num_regions=3, init_seed=1)
    frozen_before = {
        k: v.clone()
        for k, v in network.state_dict().items()
        if k.startswith(("sam.image_encoder", "sam.prompt_encoder"))
    }
    decoder_before = {k: v.clone() for k, v in network.sam.mask_decoder.state_dict().items()}
    # A naive optimizer over all parameters: weight decay would shrink frozen weights if they had grads.
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2, weight_decay=0.5)
    network.train()
    embeddings = network.encode(torch.rand(2, 3, 40, 30) * 255)
    logits = network(
        embeddings, torch.tensor([0, 2]), boxes=torch.tensor([[2.0, 2, 20, 30], [5, 5, 10, 10]]), native_hw=(40, 30)
    )
    logits.mean().backward()
    optimizer.step()
    after = network.state_dict()
    for key, value in frozen_before.items():
        assert torch.equal(after[key], value), key
    assert not network.sam.image_encoder.training
    assert not network.sam.prompt_encoder.training
    changed = [k for k, v in network.sam.mask_decoder.state_dict().items() if not torch.equal(v, decoder_before[k])]
    assert changed


def test_batched_decoding_equals_per_slice_calls(network):
    torch.manual_seed(0)
    embeddings = torch.randn(5, 256, 16, 16)
    boxes = torch.tensor([[10.0, 20, 100, 120], [30, 40, 60, 90], [0, 0, 256, 256], [5, 5, 6, 6], [50, 60, 70, 200]])
    regions = torch.tensor([0, 1, 2, 1, 0])
    batched = network.decode(embeddings, regions, boxes=boxes)
    sam = network.sam
    for i in range(5):
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[i : i + 1], masks=None)
        masks, _ = sam.mask_decoder(
            embeddings[i : i + 1], sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True
        )
        # Region k reads multimask token k + 1, which the stock call returns at index k.
        assert torch.allclose(batched[i, 0], masks[0, regions[i]], atol=1e-5)


def test_single_region_uses_single_mask_token():
    network = CalSAMNet("small", num_regions=1, init_seed=0)
    embeddings = torch.randn(2, 256, 16, 16)
    boxes = torch.tensor([[10.0, 20, 100, 120], [30, 40, 60, 90]])
    batched = network.decode(embeddings, torch.zeros(2, dtype=torch.long), boxes=boxes)
    sam = network.sam
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[1:2], masks=None)
    masks, _ = sam.mask_decoder(
        embeddings[1:2], sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False
    )
    assert torch.allclose(batched[1, 0], masks[0, 0], atol=1e-5)


def test_decode_without_pairs(network):
    out = network.decode(torch.zeros(0, 256, 16, 16), torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4))
    assert out.shape == (0, 1, 64, 64)


def test_decode_with_points_and_no_prompt(network):
    embeddings = torch.randn(3, 256, 16, 16)
    regions = torch.tensor([0, 1, 2])
    points = torch.tensor([[[10.0, 10.0], [50.0, 60.0]]]).repeat(3, 1, 1)
    labels = torch.tensor([[1, 0]]).repeat(3, 1)
    assert network.decode(embeddings, regions, points=points, point_labels=labels).shape == (3, 1, 64, 64)
    assert network.decode(embeddings, regions).shape == (3, 1, 64, 64)


def test_invalid_region_count():
    with pytest.raises(ValueError, match="num_regions"):
        CalSAMNet("small", num_regions=4)


def test_same_seed_same_encoder_hash():
    assert CalSAMNet("small", init_seed=5).encoder_sha256 == CalSAMNet("small", init_seed=5).encoder_sha256
    assert CalSAMNet("small", init_seed=5).encoder_sha256 != CalSAMNet("small", init_seed=6).encoder_sha256


def test_box_logit_prior_adds_plus_inside_minus_outside():
    # Same weights with and without the prior: the logits differ by +3 inside the box and -3 outside, in the
    # 64 x 64 decoder frame of the 256 px small SAM (box corners 64 and 128 px -> 16 and 32 mask pixels).
    plain = CalSAMNet("small", num_regions=3, init_seed=0)
    prior = CalSAMNet("small", num_regions=3, init_seed=0, box_logit_prior=3.0)
    embeddings = torch.randn(2, 256, 16, 16, generator=torch.Generator().manual_seed(0))
    regions = torch.tensor([0, 2])
    boxes = torch.tensor([[64.0, 64.0, 128.0, 128.0], [0.0, 0.0, 256.0, 256.0]])
    with torch.no_grad():
        difference = prior.decode(embeddings, regions, boxes=boxes) - plain.decode(embeddings, regions, boxes=boxes)
    expected = torch.full((2, 1, 64, 64), -3.0)
    expected[0, 0, 16:32, 16:32] = 3.0
    expected[1] = 3.0
    assert torch.allclose(difference, expected, atol=1e-5)
    # Without a box there is nothing to add.
    with torch.no_grad():
        assert torch.equal(prior.decode(embeddings, regions), plain.decode(embeddings, regions))


def test_prompt_options_follow_the_checkpoint(tmp_path):
    from scripts.decoder_checkpoint import DecoderCheckpoint, load_network

    trained = CalSAMNet("small", 64, None, 3, init_seed=0, box_mask_prompt=True, box_logit_prior=2.5)
    path = tmp_path / "model.pt"
    torch.save(DecoderCheckpoint(trained).state_dict(), path)
    loaded, _ = load_network(str(path))
    assert (loaded.box_mask_prompt, loaded.box_logit_prior) == (True, 2.5)


def test_volume_network_takes_prompt_options_from_model_pt(tmp_path):
    # MONAI Label loads model.pt into the bundle's whole-volume network, built with default options.
    from scripts.decoder_checkpoint import DecoderCheckpoint
    from scripts.volume_network import CalSAMVolumeNet

    trained = CalSAMNet("small", 64, None, 3, init_seed=0, box_mask_prompt=True, box_logit_prior=2.5)
    volume = CalSAMVolumeNet(variant="small", image_size=64, init_seed=0)
    volume.load_state_dict(DecoderCheckpoint(trained).state_dict())
    assert (volume.network.box_mask_prompt, volume.network.box_logit_prior) == (True, 2.5)
