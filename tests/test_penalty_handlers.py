"""Tests of the penalty schedule and of the FIP and CMP handlers on a bare Ignite engine."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from torch import nn

from scripts.penalty_handlers import ConfidencePenaltyHandler, FisherPenaltyHandler
from scripts.penalty_schedule import PenaltySchedule

SLICES, CHANNELS, EMBED_SIZE, OUT_SIZE = 2, 3, 4, 8


class PairDecoder(nn.Module):
    """Decoder of a 1x1 conv to two regions and bilinear upsampling, one logit map per (slice, region) pair."""

    def __init__(self, pair_slice: list[int], pair_region: list[int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, 2, kernel_size=1)
        self.register_buffer("pair_slice", torch.tensor(pair_slice, dtype=torch.long))
        self.register_buffer("pair_region", torch.tensor(pair_region, dtype=torch.long))

    def forward(self, features: torch.Tensor, pair_index: torch.Tensor | None = None) -> torch.Tensor:
        maps = F.interpolate(torch.tanh(self.conv(features)) * 3, size=(OUT_SIZE, OUT_SIZE), mode="bilinear")
        slices, regions = self.pair_slice, self.pair_region
        if pair_index is not None:
            slices, regions = slices[pair_index], regions[pair_index]
        return maps[slices, regions].unsqueeze(1)


def make_trainer(num_pairs: int = 3) -> Engine:
    """Build an engine whose iteration follows the CalSAM trainer contract around LOSS_COMPLETED."""
    torch.manual_seed(0)
    pair_slice = [i % SLICES for i in range(num_pairs)]
    decoder = PairDecoder(pair_slice, [i % 2 for i in range(num_pairs)])
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.01)
    embeddings = torch.randn(SLICES, CHANNELS, EMBED_SIZE, EMBED_SIZE)
    target = (torch.rand(num_pairs, 1, OUT_SIZE, OUT_SIZE) > 0.5).float()
    roi = torch.zeros(num_pairs, 1, OUT_SIZE, OUT_SIZE)
    roi[..., 1:7, 2:8] = 1

    def iteration(engine: Engine, batch) -> dict:
        features = embeddings.detach().requires_grad_(getattr(engine, "features_require_grad", False))
        logits = decoder(features)
        loss = F.binary_cross_entropy_with_logits(logits, target) if num_pairs else logits.sum()
        engine.state.output = {
            "loss": loss,
            "features": features,
            "logits": logits,
            "decode": decoder,
            "target": target,
            "roi": roi,
            "pair_slice": torch.tensor(pair_slice, dtype=torch.long),
            "segmentation_loss": loss,
        }
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        optimizer.zero_grad()
        engine.state.output["loss"].backward()
        optimizer.step()
        return engine.state.output

    engine = Engine(iteration)
    engine.register_events(*IterationEvents)
    engine.decoder = decoder
    return engine


def record_outputs(engine: Engine) -> list[dict]:
    records = []

    @engine.on(Events.ITERATION_COMPLETED)
    def keep(engine):
        records.append({key: value for key, value in engine.state.output.items() if key != "decode"})

    return records


def test_loss_increases_by_weighted_penalties():
    engine = make_trainer()
    FisherPenaltyHandler(weight=0.3, seed=0).attach(engine)
    ConfidencePenaltyHandler(weight=0.7).attach(engine)
    records = record_outputs(engine)
    engine.run(range(3), max_epochs=2)

    assert len(records) == 6
    for record in records:
        assert record["fip_weight"] == 0.3
        assert record["cmp_weight"] == 0.7
        assert float(record["fip"]) > 0
        assert float(record["cmp"]) > 0
        expected = record["segmentation_loss"] + 0.3 * record["fip"] + 0.7 * record["cmp"]
        assert torch.equal(record["loss"].detach(), expected.detach())


def test_cmp_terms_are_logged():
    engine = make_trainer()
    ConfidencePenaltyHandler(weight=1.0, beta=0.5).attach(engine)
    records = record_outputs(engine)
    engine.run(range(1), max_epochs=1)

    record = records[0]
    combined = record["cmp_confident_error"] + 0.5 * record["cmp_calibration_gap"]
    torch.testing.assert_close(record["cmp"], combined)


def test_exact_estimator_requests_feature_grad():
    engine = make_trainer()
    FisherPenaltyHandler(weight=0.1).attach(engine)
    assert engine.features_require_grad is True


@pytest.mark.parametrize("estimator", ["finite_difference", "subbatch"])
def test_rerunning_estimators_leave_feature_grad_off(estimator):
    engine = make_trainer()
    FisherPenaltyHandler(weight=0.1, estimator=estimator, seed=0).attach(engine)
    records = record_outputs(engine)
    engine.run(range(2), max_epochs=1)

    assert getattr(engine, "features_require_grad", False) is False
    assert all(float(record["fip"]) > 0 for record in records)


@pytest.mark.parametrize(
    "fip_handler, cmp_handler",
    [
        (FisherPenaltyHandler(weight=0.5, enabled=False), ConfidencePenaltyHandler(weight=0.5, enabled=False)),
        (FisherPenaltyHandler(weight=0.0), ConfidencePenaltyHandler(weight=0.0)),
    ],
    ids=["disabled", "zero-weight"],
)
def test_inactive_handlers_add_nothing(fip_handler, cmp_handler):
    engine = make_trainer()
    fip_handler.attach(engine)
    cmp_handler.attach(engine)
    records = record_outputs(engine)
    engine.run(range(2), max_epochs=1)

    assert getattr(engine, "features_require_grad", False) is False
    for record in records:
        assert record["loss"] is record["segmentation_loss"]
        assert float(record["fip"]) == 0.0
        assert float(record["cmp"]) == 0.0
        assert record["fip_weight"] == 0.0
        assert record["cmp_weight"] == 0.0


def test_warmup_weights_per_iteration():
    engine = make_trainer()
    FisherPenaltyHandler(weight=0.2, warmup_epochs=2, start_epoch=1, seed=0).attach(engine)
    records = record_outputs(engine)
    engine.run(range(4), max_epochs=4)

    # Progress t counts the epochs completed before the iteration. Between t = 1 and t = 3 the weight is
    # 0.2 * (t - 1) / 2.
    expected = [0.0] * 4 + [0.0, 0.025, 0.05, 0.075] + [0.1, 0.125, 0.15, 0.175] + [0.2] * 4
    assert [record["fip_weight"] for record in records] == pytest.approx(expected, abs=1e-12)
    for record in records:
        assert (float(record["fip"]) > 0) == (record["fip_weight"] > 0)


def test_zero_weight_skips_computation():
    engine = make_trainer()
    handler = FisherPenaltyHandler(weight=0.2, warmup_epochs=1, seed=0)
    calls = []

    class CountingPenalty(type(handler.penalty)):
        def __call__(self, output, iteration, rank=0):
            calls.append(iteration)
            return super().__call__(output, iteration, rank=rank)

    handler.penalty = CountingPenalty(seed=0)
    handler.attach(engine)
    engine.run(range(4), max_epochs=1)

    assert calls == [2, 3, 4]  # the first iteration of the ramp has weight 0


def test_resumed_run_gets_same_weights():
    uninterrupted = make_trainer()
    FisherPenaltyHandler(weight=0.2, warmup_epochs=2, start_epoch=1, seed=0).attach(uninterrupted)
    full = record_outputs(uninterrupted)
    uninterrupted.run(range(4), max_epochs=4)

    resumed = make_trainer()
    FisherPenaltyHandler(weight=0.2, warmup_epochs=2, start_epoch=1, seed=0).attach(resumed)
    tail = record_outputs(resumed)
    resumed.load_state_dict({"iteration": 6, "epoch_length": 4, "max_epochs": 4})
    resumed.run(range(4))

    assert [record["fip_weight"] for record in tail] == [record["fip_weight"] for record in full[6:]]


def test_no_pairs_gives_zero():
    engine = make_trainer(num_pairs=0)
    FisherPenaltyHandler(weight=0.5, seed=0).attach(engine)
    ConfidencePenaltyHandler(weight=0.5).attach(engine)
    records = record_outputs(engine)
    engine.run(range(2), max_epochs=1)  # the trainer's backward runs inside

    for record in records:
        assert float(record["fip"]) == 0.0
        assert float(record["cmp"]) == 0.0
        assert float(record["loss"].detach()) == 0.0


def test_attach_requires_iteration_events():
    engine = Engine(lambda engine, batch: None)
    with pytest.raises(ValueError, match="register_events"):
        FisherPenaltyHandler(weight=0.1).attach(engine)


def test_output_without_loss_is_rejected():
    def iteration(engine, batch):
        engine.state.output = {"logits": torch.zeros(1, 1, 2, 2)}
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

    engine = Engine(iteration)
    engine.register_events(*IterationEvents)
    ConfidencePenaltyHandler(weight=0.1).attach(engine)

    with pytest.raises(ValueError, match="'loss'"):
        engine.run(range(1), max_epochs=1)


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: FisherPenaltyHandler(weight=-0.1), "weight must be"),
        (lambda: FisherPenaltyHandler(weight=0.1, warmup_epochs=-1), "warmup_epochs must be"),
        (lambda: FisherPenaltyHandler(weight=0.1, start_epoch=float("nan")), "start_epoch must be"),
        (lambda: FisherPenaltyHandler(weight=0.1, enabled="yes"), "enabled must be"),
        (lambda: FisherPenaltyHandler(weight=0.1, estimator="exactly"), "estimator must be one of"),
        (lambda: FisherPenaltyHandler(weight=0.1, every=0), "every must be"),
        (lambda: ConfidencePenaltyHandler(weight="0.1"), "weight must be"),
        (lambda: ConfidencePenaltyHandler(weight=0.1, tau=1.5), "tau must be"),
        (lambda: ConfidencePenaltyHandler(weight=0.1, gamma=0.0), "gamma must be"),
    ],
)
def test_invalid_configuration_is_rejected(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize(
    "epoch, iteration, expected",
    [(1, 1, 0.0), (1, 4, 0.0), (2, 1, 0.0), (2, 3, 0.05), (3, 1, 0.1), (3, 4, 0.175), (4, 1, 0.2), (9, 2, 0.2)],
)
def test_schedule_hand_computed(epoch, iteration, expected):
    schedule = PenaltySchedule(0.2, warmup_epochs=2, start_epoch=1)
    assert schedule(epoch, iteration, epoch_length=4) == pytest.approx(expected, abs=1e-12)


def test_schedule_from_engine_state():
    schedule = PenaltySchedule(0.2, warmup_epochs=2, start_epoch=1)
    # Global iteration 10 with 4 iterations per epoch is the 2nd iteration of epoch 3.
    state = SimpleNamespace(iteration=10, epoch_length=4)
    assert schedule.weight_for_state(state) == schedule(3, 2, 4) == pytest.approx(0.125)


def test_schedule_without_ramp_ignores_epoch_length():
    assert PenaltySchedule(0.3).weight_for_state(SimpleNamespace(iteration=5, epoch_length=None)) == 0.3


def test_schedule_ramp_needs_epoch_length():
    schedule = PenaltySchedule(0.3, warmup_epochs=1)
    with pytest.raises(ValueError, match="epoch_length"):
        schedule.weight_for_state(SimpleNamespace(iteration=5, epoch_length=None))


def test_schedule_rejects_counters_out_of_range():
    schedule = PenaltySchedule(0.3, warmup_epochs=1)
    with pytest.raises(ValueError, match="iteration in"):
        schedule(1, 5, epoch_length=4)
