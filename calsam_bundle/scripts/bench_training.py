"""Training-step benchmarks on the real ``CalSAMTrainer``: cached embeddings vs the encoder every step, the cost of
each FIP estimator, and how an epoch's wall time divides between the decoder step and everything else.

Steps run through ``CalSAMTrainer._iteration`` with the trainer's own handlers attached, so the measured work
is what training does: prompt jitter, decoder forward, Dice + BCE, penalty handlers on ``LOSS_COMPLETED``,
backward and AdamW step. Networks have random weights; step cost does not depend on the weight values.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader

from .bench_timing import interleaved_rounds, median, paired_ratio
from .cases import prepare_case
from .embedding_store import EmbeddingStore
from .evaluator import CalSAMEvaluator
from .network import CalSAMNet
from .penalty_handlers import ConfidencePenaltyHandler, FisherPenaltyHandler
from .slabs import SlabDataset, first_item
from .trainer import CalSAMTrainer

logger = logging.getLogger(__name__)

# BraTS channel order t1, t1ce, t2, flair shown to SAM as (flair, t1ce, t2), as in configs/train.yaml.
IMAGE_CHANNELS = [3, 1, 2]
FIP_WEIGHT = 0.1

# (row label, FisherPenaltyHandler keyword arguments or None for no FIP, trainer.features_require_grad forced on).
FIP_VARIANTS: list[tuple[str, dict | None, bool]] = [
    ("no FIP", None, False),
    ("no FIP, feature gradient kept", None, True),
    ("exact", {"estimator": "exact"}, False),
    ("finite_difference, eps 1e-2", {"estimator": "finite_difference", "eps": 1e-2}, False),
    ("subbatch, fraction 0.25", {"estimator": "subbatch", "fraction": 0.25}, False),
    ("subbatch, 1 pair", {"estimator": "subbatch", "max_pairs": 1}, False),
    ("every_k, k 4", {"estimator": "every_k", "every": 4}, False),
    ("every_k, k 8", {"estimator": "every_k", "every": 8}, False),
    ("every_k, k 16", {"estimator": "every_k", "every": 16}, False),
]


def prepare_cases(items: list[dict], network: CalSAMNet, keep_volume: bool = False) -> list[dict]:
    """Embed the target slices of ``items`` with ``network`` into an in-memory store (no disk cache)."""
    store = EmbeddingStore(network, cache_dir=None, dtype="float16")
    return [prepare_case(item, store, image_channels=IMAGE_CHANNELS, keep_volume=keep_volume) for item in items]


def slabs_of(cases: list[dict], slab_size: int) -> list[dict]:
    """Return every slab of ``slab_size`` slices with at least one prompted pair, in dataset order."""
    dataset = SlabDataset(cases, slab_size)
    return [dataset[index] for index in range(len(dataset))]


def first_slices(slab: dict, count: int) -> dict:
    """Cut a slab to its first ``count`` slices."""
    return {key: value if key == "case_id" else value[:count] for key, value in slab.items()}


def build_trainer(
    network: CalSAMNet,
    slabs: list[dict],
    handlers: list | None = None,
    encoder_every_step: bool = False,
    features_require_grad: bool = False,
    max_epochs: int = 1,
) -> CalSAMTrainer:
    """Build a ``CalSAMTrainer`` over ``slabs`` with the recipe's loss, optimizer, box jitter and ROI margin."""
    loader = DataLoader(slabs, batch_size=1, shuffle=True, collate_fn=first_item)
    trainer = CalSAMTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.AdamW(network.trainable_parameters(), lr=1e-4, weight_decay=1e-4),
        loss_function=DiceCELoss(sigmoid=True, batch=True),
        train_handlers=handlers or [],
        box_jitter=0.1,
        roi_margin=5,
        prompt_seed=0,
        encoder_every_step=encoder_every_step,
    )
    if features_require_grad:
        trainer.features_require_grad = True
    return trainer


def step_runner(trainer: CalSAMTrainer, slabs: list[dict], steps: int = 1) -> Callable[[], None]:
    """Return a function that runs ``steps`` training iterations on the next slabs, cycling through ``slabs``.

    Every runner starts at the first slab, so runners called the same number of times see the same data.
    """
    cursor = itertools.cycle(slabs)

    def run() -> None:
        for _ in range(steps):
            trainer.state.iteration += 1
            trainer._iteration(trainer, next(cursor))

    return run


def fip_handler(settings: dict) -> FisherPenaltyHandler:
    """Build a FIP handler at the recipe weight, with no warm-up and seeded draws."""
    return FisherPenaltyHandler(weight=FIP_WEIGHT, warmup_epochs=0, seed=0, **settings)


def benchmark_fip_estimators(
    network: CalSAMNet, slabs: list[dict], rounds: int, block: int = 16, variants=FIP_VARIANTS
) -> list[dict]:
    """Time ``block`` consecutive steps per variant and round; return one row per variant.

    ``block`` must be a multiple of every ``every_k`` period so that each timed block computes the exact
    estimate equally often (``block / k`` times).

    Returns:
        Rows with ``variant``, ``settings``, median CPU and wall seconds per step, and the paired ratios to the
        first variant (``no FIP``).
    """
    functions = {}
    for name, settings, keep_feature_grad in variants:
        handlers = [] if settings is None else [fip_handler(settings)]
        trainer = build_trainer(network, slabs, handlers, features_require_grad=keep_feature_grad)
        functions[name] = step_runner(trainer, slabs, block)
    times = interleaved_rounds(functions, rounds, warmup=1)
    baseline = variants[0][0]
    return [
        {
            "variant": name,
            "settings": settings,
            "cpu_per_step": median(times[name]["cpu"]) / block,
            "wall_per_step": median(times[name]["wall"]) / block,
            "cpu_ratio": paired_ratio(times, name, baseline, "cpu"),
            "wall_ratio": paired_ratio(times, name, baseline, "wall"),
        }
        for name, settings, _ in variants
    ]


def predicted_every_k_ratio(every: int, exact_ratio: float, feature_grad_ratio: float = 1.0) -> float:
    """Step-time ratio of ``every_k`` predicted from measured ones: one exact step and ``every - 1`` plain steps
    that keep the feature gradient, per ``every`` steps."""
    return ((every - 1) * feature_grad_ratio + exact_ratio) / every


def benchmark_fip_large_embeddings(
    slab: dict,
    rounds: int,
    image_size: int = 1024,
    variants: list[tuple[str, dict | None, bool]] | None = None,
    block: int = 1,
) -> list[dict]:
    """Time FIP variants (default: no FIP vs exact) with ``image_size / 16`` square embeddings, ``block`` steps
    per round.

    SAM's mask decoder is the same for every variant and the encoder does not run on cached embeddings, so the
    small SAM built at ``image_size`` gives the decoder step of ViT-B at that size without ViT-B's weights. The
    embeddings are random: the decoder's cost does not depend on their values.
    """
    k = slab["valid"].shape[1]
    network = CalSAMNet("small", image_size, num_regions=k, init_seed=0)
    c, h, w = 256, image_size // 16, image_size // 16
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn((len(slab["slices"]), c, h, w), generator=generator).to(torch.float16)
    if variants is None:
        variants = [("no FIP", None, False), ("exact", {"estimator": "exact"}, False)]
    return benchmark_fip_estimators(
        network, [dict(slab, embeddings=embeddings)], rounds, block=block, variants=variants
    )


def benchmark_cache_vs_encoder(variant: str, image_size: int, slab: dict, rounds: int, init_seed: int = 0) -> dict:
    """Compare one training step on cached embeddings with one that runs the frozen encoder on the slab.

    Also times inference on the same slab: the encoder alone and the decoder alone (no gradient), per slice.

    Args:
        variant, image_size: SAM size and encoder input side.
        slab: a slab dict from ``slabs_of``; its ``embeddings`` are replaced by this network's.
        rounds: timed rounds after one warm-up round.

    Returns:
        Median CPU and wall seconds of each timed function, the paired ratios and the slab size.
    """
    network = CalSAMNet(variant, image_size, num_regions=slab["valid"].shape[1], init_seed=init_seed)
    started = time.perf_counter()
    slab = dict(slab, embeddings=network.encode(slab["slices"].float()).to(torch.float16))
    logger.info(
        "%s at %d px: embedded %d slices in %.1f s.",
        variant,
        image_size,
        len(slab["slices"]),
        time.perf_counter() - started,
    )
    cached = build_trainer(network, [slab])
    encoder = build_trainer(network, [slab], encoder_every_step=True)
    pair_slice, pair_region = slab["valid"].nonzero(as_tuple=True)
    native_hw = tuple(slab["regions"].shape[-2:])

    @torch.no_grad()
    def decode_only() -> None:
        embeddings = slab["embeddings"][pair_slice].float()
        network(embeddings, pair_region, boxes=slab["boxes"][pair_slice, pair_region].float(), native_hw=native_hw)

    functions = {
        "cached step": step_runner(cached, [slab]),
        "encoder step": step_runner(encoder, [slab]),
        "encoder only": lambda: network.encode(slab["slices"].float()),
        "decoder only": decode_only,
    }
    times = interleaved_rounds(functions, rounds, warmup=1)
    slices = len(slab["slices"])
    return {
        "variant": variant,
        "image_size": image_size,
        "slices": slices,
        "pairs": len(pair_slice),
        "embedding": tuple(slab["embeddings"].shape[1:]),
        "times": {name: {clock: median(values) for clock, values in entry.items()} for name, entry in times.items()},
        "cpu_ratio": paired_ratio(times, "encoder step", "cached step", "cpu"),
        "wall_ratio": paired_ratio(times, "encoder step", "cached step", "wall"),
    }


class EpochTimer:
    """Ignite handlers that add up where a training epoch's wall time goes.

    Attach it after the penalty handlers, so its ``LOSS_COMPLETED`` timestamp falls after their work.
    Segments: ``data`` (fetching the batch), ``forward`` (features, prompt jitter, decoder forward),
    ``loss and penalties``, ``backward``, ``optimizer`` and ``iteration end`` (output clean-up and the
    ``ITERATION_COMPLETED`` handlers registered before this one).
    """

    SEGMENTS = ("data", "forward", "loss and penalties", "backward", "optimizer", "iteration end")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.SEGMENTS, 0.0)
        self.epoch_seconds = 0.0
        self.iterations = 0
        self._mark = 0.0
        self._epoch_start = 0.0

    def _stamp(self, segment: str | None) -> Callable:
        def handler(engine) -> None:
            now = time.perf_counter()
            if segment is not None:
                self.seconds[segment] += now - self._mark
            self._mark = now

        return handler

    def attach(self, engine) -> None:
        """Register the timestamps on ``engine``'s Ignite and MONAI iteration events."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._start_epoch)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._stamp(None))
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._stamp("data"))
        engine.add_event_handler(Events.ITERATION_STARTED, self._stamp(None))
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._stamp("forward"))
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._stamp("loss and penalties"))
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._stamp("backward"))
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self._stamp("optimizer"))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._stamp("iteration end"))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._end_epoch)

    def _start_epoch(self, engine) -> None:
        self._epoch_start = time.perf_counter()

    def _count(self, engine) -> None:
        self.iterations += 1

    def _end_epoch(self, engine) -> None:
        self.epoch_seconds += time.perf_counter() - self._epoch_start


def benchmark_epoch_share(
    network: CalSAMNet, slabs: list[dict], val_cases: list[dict], fip_settings: dict, epochs: int = 1
) -> dict:
    """Run real training epochs with the FIP and CMP handlers, then one validation pass, and split their time.

    Returns:
        ``segments`` (wall seconds per ``EpochTimer`` segment), ``epoch_seconds``, ``iterations``,
        ``validation_seconds`` and ``validation_cases``.
    """
    handlers = [
        fip_handler(fip_settings),
        ConfidencePenaltyHandler(weight=0.5, warmup_epochs=0, tau=0.5, gamma=2.0, beta=1.0),
    ]
    trainer = build_trainer(network, slabs, handlers, max_epochs=epochs)
    timer = EpochTimer()
    timer.attach(trainer)
    trainer.run()

    evaluator = CalSAMEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(val_cases, batch_size=1, collate_fn=first_item),
        network=network,
    )
    started = time.perf_counter()
    evaluator.run()
    return {
        "segments": timer.seconds,
        "epoch_seconds": timer.epoch_seconds,
        "iterations": timer.iterations,
        "validation_seconds": time.perf_counter() - started,
        "validation_cases": len(val_cases),
    }
