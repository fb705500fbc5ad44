"""Ignite handlers that add the weighted FIP and CMP terms to the trainer's loss before backward.

Both handlers run on ``IterationEvents.LOSS_COMPLETED``, which the trainer fires after it stores its output dict
(``"loss"``, ``"logits"``, ``"target"``, ``"roi"``, ``"features"``, ``"decode"``, ``"pair_slice"``) in
``engine.state.output`` and before it calls ``output["loss"].backward()``. Each handler replaces ``output["loss"]``
with ``loss + weight * value`` and stores its value and weight in the dict on every iteration, so loggers can read
them. Typical bundle config::

    - _target_: scripts.penalty_handlers.FisherPenaltyHandler
      weight: 0.1
      warmup_epochs: 2
"""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from .cmp import confidence_misalignment_terms, validate_cmp_parameters
from .distributed import get_rank
from .fip import FisherPenalty
from .penalty_schedule import PenaltySchedule

logger = logging.getLogger(__name__)

__all__ = ["ConfidencePenaltyHandler", "FisherPenaltyHandler"]


class _PenaltyHandler:
    """Base class with the attach, schedule and logging steps. Subclasses implement ``compute``."""

    value_key: str
    weight_key: str

    def __init__(self, weight: float, warmup_epochs: float, start_epoch: float, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be True or False, got {enabled!r}.")
        self.schedule = PenaltySchedule(weight, warmup_epochs=warmup_epochs, start_epoch=start_epoch)
        self.enabled = enabled

    @property
    def active(self) -> bool:
        """Whether the handler can ever add a non-zero term."""
        return self.enabled and self.schedule.weight > 0

    def attach(self, engine: Engine) -> None:
        """Register the handler on ``IterationEvents.LOSS_COMPLETED`` of ``engine``.

        Raises:
            ValueError: when the engine has not registered MONAI's ``IterationEvents``.
        """
        try:
            engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)
        except ValueError as error:
            raise ValueError(
                f"{type(self).__name__} runs on IterationEvents.LOSS_COMPLETED, which this {type(engine).__name__} "
                "has not registered. MONAI workflows register it; on a plain ignite Engine call "
                "engine.register_events(*monai.engines.utils.IterationEvents) first."
            ) from error
        logger.info("%s attached: %r, enabled=%s.", type(self).__name__, self.schedule, self.enabled)

    def compute(self, output: dict, engine: Engine) -> torch.Tensor:
        """Compute the unweighted penalty, a 0-d tensor, from the trainer's output dict."""
        raise NotImplementedError

    def __call__(self, engine: Engine) -> None:
        """Add the weighted penalty to ``output["loss"]`` and store the value and the weight in the output dict."""
        output = engine.state.output
        if not isinstance(output, dict):
            raise ValueError(
                f"{type(self).__name__} expects engine.state.output to be a dict when LOSS_COMPLETED fires, "
                f"got {type(output).__name__}."
            )
        if CommonKeys.LOSS not in output:
            raise ValueError(
                f"{type(self).__name__} adds its term to output['{CommonKeys.LOSS}'], which is missing; the output "
                f"dict has keys {sorted(output)}."
            )
        loss = output[CommonKeys.LOSS]
        weight = self.schedule.weight_for_state(engine.state) if self.enabled else 0.0

        # A zero weight (disabled, or the first iteration of a ramp) skips the computation but still logs.
        if weight == 0.0:
            value = torch.zeros((), device=loss.device, dtype=loss.dtype)
        else:
            value = self.compute(output, engine)
            output[CommonKeys.LOSS] = loss + weight * value
        output[self.value_key] = value.detach()
        output[self.weight_key] = weight


class FisherPenaltyHandler(_PenaltyHandler):
    """Add ``weight * FIP`` to the loss, with the weight from a :class:`PenaltySchedule`.

    On attach, an enabled handler with a positive weight sets ``engine.features_require_grad = True`` when its
    estimator differentiates the trainer's own logits (``exact``, ``every_k``). ``finite_difference`` and
    ``subbatch`` rerun the decoder through ``output["decode"]`` and leave the attribute untouched, which saves the
    feature gradient in the main backward.

    Stores ``output["fip"]`` (0-d detached tensor) and ``output["fip_weight"]`` (float) on every iteration.

    Args:
        weight: final weight ``lambda_F``, non-negative.
        warmup_epochs: linear ramp length in epochs.
        start_epoch: epochs trained before the penalty starts.
        enabled: False logs 0 and adds nothing.
        estimator, fisher, eps, fraction, max_pairs, every, seed: passed to :class:`scripts.fip.FisherPenalty`.

    Raises:
        ValueError: on invalid values, from the schedule or the estimator.
    """

    value_key = "fip"
    weight_key = "fip_weight"

    def __init__(
        self,
        weight: float,
        warmup_epochs: float = 0,
        start_epoch: float = 0,
        enabled: bool = True,
        estimator: str = "exact",
        fisher: str = "sampled",
        eps: float = 1e-2,
        fraction: float = 0.25,
        max_pairs: int | None = None,
        every: int = 4,
        seed: int | None = None,
    ) -> None:
        super().__init__(weight, warmup_epochs, start_epoch, enabled)
        self.penalty = FisherPenalty(
            estimator=estimator, fisher=fisher, eps=eps, fraction=fraction, max_pairs=max_pairs, every=every, seed=seed
        )

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.active and self.penalty.needs_feature_grad:
            engine.features_require_grad = True

    def compute(self, output: dict, engine: Engine) -> torch.Tensor:
        # Each rank draws its own Fisher labels and directions, so DDP averages independent estimates.
        rank = get_rank()
        return self.penalty(output, engine.state.iteration, rank=rank)


class ConfidencePenaltyHandler(_PenaltyHandler):
    """Add ``weight * CMP`` to the loss, with the weight from a :class:`PenaltySchedule`.

    Stores ``output["cmp"]`` (0-d detached tensor) and ``output["cmp_weight"]`` (float) on every iteration, and the
    unweighted terms as ``output["cmp_confident_error"]`` and ``output["cmp_calibration_gap"]`` on iterations that
    compute them.

    Args:
        weight: final weight ``lambda_C``, non-negative.
        warmup_epochs: linear ramp length in epochs.
        start_epoch: epochs trained before the penalty starts.
        enabled: False logs 0 and adds nothing.
        tau, gamma, beta: passed to :func:`scripts.cmp.confidence_misalignment_penalty`.

    Raises:
        ValueError: on invalid values.
    """

    value_key = "cmp"
    weight_key = "cmp_weight"

    def __init__(
        self,
        weight: float,
        warmup_epochs: float = 0,
        start_epoch: float = 0,
        enabled: bool = True,
        tau: float = 0.5,
        gamma: float = 2.0,
        beta: float = 1.0,
    ) -> None:
        super().__init__(weight, warmup_epochs, start_epoch, enabled)
        validate_cmp_parameters(tau, gamma, beta)
        self.tau = float(tau)
        self.gamma = float(gamma)
        self.beta = float(beta)

    def compute(self, output: dict, engine: Engine) -> torch.Tensor:
        missing = [key for key in ("logits", "target", "roi") if key not in output]
        if missing:
            raise ValueError(
                f"The output dict lacks {missing}, which the CMP needs; it has keys {sorted(output)}. The trainer "
                "must store them before LOSS_COMPLETED."
            )
        terms = confidence_misalignment_terms(
            output["logits"], output["target"], output["roi"], tau=self.tau, gamma=self.gamma
        )
        output["cmp_confident_error"] = terms.confident_error.detach()
        output["cmp_calibration_gap"] = terms.calibration_gap.detach()
        return terms.confident_error + self.beta * terms.calibration_gap
