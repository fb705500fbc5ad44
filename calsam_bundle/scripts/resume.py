"""Resumable training: what the training state holds, where it is saved, and resuming from the newest file.

Layout under ``models/`` (``ckpt_dir``):

- ``model.pt``: the decoder with the best validation metric, written by ``atomic_checkpoint.AtomicCheckpointSaver``.
- ``train_state/checkpoint_epoch=N.pt``: the whole training state after epoch ``N``, the newest ``n_saved`` kept.
  Keys: ``trainer`` (epoch, iteration, epoch length), ``decoder`` (``DecoderCheckpoint``), ``optimizer``,
  ``lr_scheduler``, ``rng`` (Python, NumPy, torch and CUDA generators plus the prompt jitter generator, per rank)
  and ``validation`` (best metric so far and the best-model saver's record).
- ``train_state/previous/``: training-state files of an earlier run that the current run does not continue from.

All files are written through ``atomic_checkpoint``, so a process killed at any moment, SIGKILL included, leaves
each file either whole or as it was before.

FIP and CMP keep no state of their own: their weights follow from the trainer's epoch and iteration counters, and
seeded FIP draws from ``(seed, rank, iteration)``, so restoring the trainer restores them.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from .atomic_checkpoint import AtomicCheckpointSaver
from .distributed import all_gather_objects, get_rank, get_world_size, is_rank_zero

logger = logging.getLogger(__name__)

TRAIN_STATE_PATTERN = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")
RESUME_CHOICES = (False, True, "auto")


def _capture_local(generators: Mapping[str, torch.Generator]) -> dict:
    key, numpy_state, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        # weights_only loading accepts tensors but not NumPy arrays.
        "numpy": {
            "key": key,
            "state": torch.from_numpy(numpy_state.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "generators": {name: generator.get_state() for name, generator in generators.items()},
    }


def _restore_local(state: dict, generators: Mapping[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["key"],
            numpy_state["state"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    missing = sorted(set(generators) - set(state["generators"]))
    if missing:
        raise ValueError(
            f"The checkpoint has no state for the random generators {missing}; it was saved by another config."
        )
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])


class RandomState:
    """State of the global random generators and of named ``torch.Generator`` objects, one entry per rank.

    Ranks draw different random numbers (FIP labels, prompt jitter), so a resumed multi-process run replays an
    uninterrupted one only when each rank gets its own state back. :meth:`capture` gathers every rank's state and
    must run on all ranks at the same point; :func:`attach_train_state` registers it before the saver.

    Args:
        generators: named generators to include, for example ``{"prompt": trainer.prompt_generator}``.
    """

    def __init__(self, generators: Mapping[str, torch.Generator] | None = None) -> None:
        self.generators = dict(generators or {})
        self._captured: list[dict] | None = None

    def capture(self, engine: Engine | None = None) -> None:
        """Gather the current state of every rank; collective, so every rank calls it."""
        self._captured = all_gather_objects(_capture_local(self.generators))

    def state_dict(self) -> dict:
        """States of all ranks at the last :meth:`capture`, or of this process now when none was captured."""
        ranks = self._captured if self._captured is not None else [_capture_local(self.generators)]
        return {"world_size": len(ranks), "ranks": ranks}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore this rank's entry; when the number of ranks changed, rank ``r`` takes entry ``r mod n``."""
        ranks = state_dict["ranks"]
        rank = get_rank()
        if len(ranks) != get_world_size():
            logger.warning(
                "The checkpoint contains random states of %d ranks but this run has %d; rank %d takes entry %d, so "
                "random draws differ from an uninterrupted run.",
                len(ranks),
                get_world_size(),
                rank,
                rank % len(ranks),
            )
        _restore_local(ranks[rank % len(ranks)], self.generators)


class ValidationState:
    """Best validation metric of an evaluator and the best-model saver's record, for resuming without regressions.

    Without it a resumed run would treat its first validation as the best so far and overwrite ``model.pt`` with a
    possibly worse model.

    Args:
        evaluator: the validation engine; its ``state.best_metric`` and ``state.best_metric_epoch`` are kept.
        saver: the saver of the best model, or None.
    """

    def __init__(self, evaluator: Engine, saver: AtomicCheckpointSaver | None = None) -> None:
        self.evaluator = evaluator
        self.saver = saver

    def state_dict(self) -> dict:
        return {
            "best_metric": float(getattr(self.evaluator.state, "best_metric", -1)),
            "best_metric_epoch": int(getattr(self.evaluator.state, "best_metric_epoch", -1)),
            "saver": self.saver.state_dict() if self.saver is not None else {},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.evaluator.state.best_metric = state_dict["best_metric"]
        self.evaluator.state.best_metric_epoch = state_dict["best_metric_epoch"]
        if self.saver is not None:
            self.saver.load_state_dict(state_dict["saver"])


def list_train_states(folder: str | Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the ``checkpoint_epoch=N.pt`` files in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = TRAIN_STATE_PATTERN.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def find_latest_checkpoint(folder: str | Path) -> Path | None:
    """Newest training-state file in ``folder`` that loads, or None; unreadable ones are skipped with a warning."""
    for _, path in list_train_states(folder):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        # A damaged file can fail in many ways (RuntimeError, EOFError, IndexError, UnpicklingError, ...); any
        # failure means this file cannot be resumed from.
        except Exception as error:  # noqa: BLE001
            logger.warning("Skipping unreadable training state %s (%s); trying an older one.", path, error)
            continue
        return path
    return None


def resolve_resume_path(resume: bool | str, folder: str | Path) -> Path | None:
    """Return the training state to resume from, following the ``resume`` setting.

    Args:
        resume: False starts from scratch. True resumes from the newest checkpoint and fails without one. "auto"
            resumes when a checkpoint exists and starts from scratch otherwise.
        folder: the training-state folder.

    Raises:
        ValueError: ``resume`` is not one of False, True, "auto".
        FileNotFoundError: ``resume`` is True and no readable checkpoint exists.
    """
    if resume not in RESUME_CHOICES or (isinstance(resume, int) and not isinstance(resume, bool)):
        raise ValueError(f"resume must be one of false, true or 'auto', got {resume!r}.")
    if resume is False:
        return None
    path = find_latest_checkpoint(folder)
    if path is None and resume is True:
        raise FileNotFoundError(
            f"resume is true but {str(folder)!r} contains no readable checkpoint_epoch=N.pt; set resume: auto to start "
            "from scratch when none exists, or point ckpt_dir at the earlier run."
        )
    if path is None:
        logger.info("resume is auto and %s contains no checkpoint, so training starts from scratch.", folder)
    return path


def _tidy_train_state_folder(folder: Path, resumed: Path | None) -> list[tuple[int, str]]:
    """Prepare the folder for a run and return the ``(epoch, name)`` files it continues from.

    Files from an earlier run that this run does not continue (all of them when starting from scratch, and
    unreadable ones newer than the resumed file) move to ``previous/``, replacing what is there. Left in place, a
    stale ``checkpoint_epoch=40.pt`` would outrank the new run's files in rotation and be picked by a later resume.
    """
    # A kill during a write leaves its temporary file; the checkpoints themselves are whole.
    for stale in folder.glob(".checkpoint_epoch=*.tmp"):
        logger.info("Removing %s, left by a write that was interrupted.", stale)
        stale.unlink(missing_ok=True)
    resumed_epoch = 0
    if resumed is not None:
        resumed_epoch = int(TRAIN_STATE_PATTERN.match(resumed.name).group(1))
    continued, set_aside = [], []
    for epoch, path in list_train_states(folder):
        if resumed is not None and epoch <= resumed_epoch:
            continued.append((epoch, path))
        else:
            set_aside.append((epoch, path))
    if set_aside:
        previous = folder / "previous"
        shutil.rmtree(previous, ignore_errors=True)
        previous.mkdir()
        for _, path in set_aside:
            path.replace(previous / path.name)
        logger.warning(
            "Moved %d training-state files that this run does not continue from to %s.", len(set_aside), previous
        )
    return [(epoch, path.name) for epoch, path in continued]


def attach_train_state(
    trainer: Engine,
    objects: dict,
    save_dir: str | Path,
    resume: bool | str = False,
    save_interval: int = 1,
    n_saved: int | None = 2,
    map_location: str = "cpu",
) -> Path | None:
    """Save the training state every ``save_interval`` epochs and, when resuming, load it before the first epoch.

    Call it after the trainer is built with all its handlers, so that the state is captured after validation and
    the learning-rate step of the epoch. Every rank captures its random state, but only rank 0 writes files. Every
    rank loads the same file, so ``save_dir`` must be shared by all ranks of a multi-node run.

    Args:
        trainer: the training engine.
        objects: name to object with ``state_dict``/``load_state_dict``; the keys of the saved file.
        save_dir: the training-state folder, ``models/train_state`` in the bundle.
        resume: see :func:`resolve_resume_path`.
        save_interval: epochs between saves, at least 1.
        n_saved: newest files kept, None for all.
        map_location: device the checkpoint tensors are loaded to before each object copies them.

    Returns:
        The checkpoint path being resumed from, or None.

    Raises:
        ValueError: on an invalid ``resume``, ``save_interval`` or ``n_saved``.
    """
    if isinstance(save_interval, bool) or not isinstance(save_interval, int) or save_interval < 1:
        raise ValueError(f"save_interval must be a positive number of epochs, got {save_interval!r}.")
    if n_saved is not None and (isinstance(n_saved, bool) or not isinstance(n_saved, int) or n_saved < 1):
        raise ValueError(f"n_saved must be None or a positive integer, got {n_saved!r}.")
    path = resolve_resume_path(resume, save_dir)

    for item in objects.values():
        if hasattr(item, "capture"):
            trainer.add_event_handler(Events.EPOCH_COMPLETED(every=save_interval), item.capture)
    if is_rank_zero():
        saver = AtomicCheckpointSaver(
            save_dir=str(save_dir), save_dict=objects, save_interval=save_interval, n_saved=n_saved, epoch_level=True
        )
        saver.adopt_interval_files(_tidy_train_state_folder(Path(save_dir), path))
        saver.attach(trainer)
    if path is not None:
        CheckpointLoader(load_path=str(path), load_dict=objects, map_location=map_location).attach(trainer)
        logger.info("Resuming training from %s.", path)
    return path
