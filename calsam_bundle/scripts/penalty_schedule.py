"""Weight of a loss penalty over training: off, then a linear per-iteration ramp, then constant."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["PenaltySchedule"]


def _check_non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}.")
    return float(value)


class PenaltySchedule:
    """Penalty weight as a function of training progress, computed from the engine state alone.

    Progress ``t`` counts the epochs completed before the current iteration starts, in fractions of an epoch:
    ``t = (epoch - 1) + (iteration - 1) / epoch_length``. The weight is

    - 0 while ``t < start_epoch``;
    - ``weight * (t - start_epoch) / warmup_epochs`` while ``start_epoch <= t < start_epoch + warmup_epochs``, so
      the first iteration of the ramp has weight 0 and the weight grows every iteration;
    - ``weight`` afterwards, and from ``t = start_epoch`` on when ``warmup_epochs == 0``.

    Because the weight depends only on the epoch and iteration counters that Ignite checkpoints, a resumed run gets
    the same weight as an uninterrupted one.

    Args:
        weight: final weight, e.g. ``lambda_F`` or ``lambda_C``.
        warmup_epochs: length of the linear ramp in epochs; fractions are allowed.
        start_epoch: number of epochs trained without the penalty; fractions are allowed.

    Raises:
        ValueError: when an argument is negative or not a finite number.

    Example:
        ``PenaltySchedule(0.2, warmup_epochs=2, start_epoch=1)(epoch=3, iteration=1, epoch_length=4)`` is 0.1.
    """

    def __init__(self, weight: float, warmup_epochs: float = 0, start_epoch: float = 0) -> None:
        self.weight = _check_non_negative("weight", weight)
        self.warmup_epochs = _check_non_negative("warmup_epochs", warmup_epochs)
        self.start_epoch = _check_non_negative("start_epoch", start_epoch)

    @property
    def needs_epoch_length(self) -> bool:
        """Whether the weight depends on the position inside an epoch, which needs ``epoch_length``."""
        return self.weight > 0 and (self.warmup_epochs > 0 or self.start_epoch > 0)

    def __call__(self, epoch: int, iteration: int, epoch_length: int | None) -> float:
        """Return the weight at an iteration.

        Args:
            epoch: 1-based epoch number, as ``engine.state.epoch`` during a run.
            iteration: 1-based iteration inside the epoch, from 1 to ``epoch_length``.
            epoch_length: iterations per epoch; may be None only when ``needs_epoch_length`` is False.

        Raises:
            ValueError: on counters out of range, or a missing ``epoch_length`` that the schedule needs.
        """
        if not self.needs_epoch_length:
            return self.weight
        self._check_epoch_length(epoch_length)
        if epoch < 1 or not 1 <= iteration <= epoch_length:
            raise ValueError(
                f"epoch must be >= 1 and iteration in [1, {epoch_length}], got epoch={epoch}, iteration={iteration}."
            )
        progress = (epoch - 1) + (iteration - 1) / epoch_length - self.start_epoch
        if progress < 0:
            return 0.0
        if self.warmup_epochs == 0 or progress >= self.warmup_epochs:
            return self.weight
        return self.weight * progress / self.warmup_epochs

    def weight_for_state(self, state: Any) -> float:
        """Return the weight at the current iteration of an Ignite ``engine.state``.

        Uses the global ``state.iteration`` (1-based, counted over all epochs, restored on resume) and
        ``state.epoch_length``. The epoch and the iteration inside it are derived from those two.
        """
        if not self.needs_epoch_length:
            return self.weight
        epoch_length = state.epoch_length
        self._check_epoch_length(epoch_length)
        epoch, iteration = divmod(state.iteration - 1, epoch_length)
        return self(epoch + 1, iteration + 1, epoch_length)

    def _check_epoch_length(self, epoch_length: object) -> None:
        if (
            epoch_length is None
            or isinstance(epoch_length, bool)
            or not isinstance(epoch_length, int)
            or epoch_length < 1
        ):
            raise ValueError(
                f"A penalty with start_epoch={self.start_epoch} and warmup_epochs={self.warmup_epochs} needs a "
                f"positive integer epoch_length, got {epoch_length!r}. Pass epoch_length to the trainer when its "
                "data loader has no length."
            )

    def __repr__(self) -> str:
        return (
            f"PenaltySchedule(weight={self.weight}, warmup_epochs={self.warmup_epochs}, start_epoch={self.start_epoch})"
        )
