"""Checkpoint files that a killed process never leaves half-written.

Each file is written to a temporary name in its folder, flushed to disk and renamed over the target, so a process
killed at any moment, SIGKILL included, leaves the file either whole or as it was before. Ignite's ``Checkpoint``
removes the oldest file before writing the new one; :class:`AtomicDiskSaver` postpones those removals until the
new file exists.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from .atomic_files import temporary_sibling
from .distributed import get_rank

logger = logging.getLogger(__name__)


class AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` that writes by temporary file, ``fsync`` and rename, and deletes old files afterwards.

    Ignite's ``Checkpoint`` calls its saver's ``remove`` for the oldest file before it writes the new one. This saver
    postpones those removals until the next write has succeeded, so the newest complete checkpoint exists on disk
    at every moment, even with ``n_saved=1``. Only rank ``save_on_rank`` writes.

    Args:
        dirname: destination folder, created if missing.
        filename: fixed file name used for every save (``model.pt``), or None for the names ``Checkpoint`` gives.
        save_on_rank: the rank that writes.
    """

    def __init__(self, dirname: str | Path, filename: str | None = None, save_on_rank: int = 0) -> None:
        super().__init__(
            dirname=str(dirname), atomic=True, create_dir=True, require_empty=False, save_on_rank=save_on_rank
        )
        self.filename = filename
        self._pending_removals: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if get_rank() != self.save_on_rank:
            return
        filename = self.filename or filename
        write_atomic(checkpoint, Path(self.dirname) / filename)
        logger.info("Wrote checkpoint %s", Path(self.dirname) / filename)
        for old in self._pending_removals:
            if old != filename:
                (Path(self.dirname) / old).unlink(missing_ok=True)
        self._pending_removals = []

    def remove(self, filename: str) -> None:
        if get_rank() == self.save_on_rank:
            self._pending_removals.append(self.filename or filename)


def write_atomic(content: object, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flush it to disk, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = temporary_sibling(path)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(content, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    # A killed process cannot undo a finished rename, but power loss can until the folder entry reaches the disk.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files are written atomically, with the key-metric record as a state.

    MONAI 1.6.1's saver writes in place (``DiskSaver(atomic=False)``), so a kill during a write leaves a truncated
    file, and with a fixed ``key_metric_filename`` it deletes the previous best model before writing the new one.
    This subclass gives each of its ignite ``Checkpoint`` objects an :class:`AtomicDiskSaver` instead. Arguments
    are those of ``CheckpointSaver``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # NOTE: the three attribute names are MONAI 1.6.1 internals; a MONAI upgrade must keep or update them.
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed_name = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, filename=fixed_name)

    def state_dict(self) -> dict:
        """Return the key-metric record (scores and names of the kept best models), empty without key-metric saving."""
        if self._key_metric_checkpoint is None:
            return {}
        return dict(self._key_metric_checkpoint.state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the key-metric record, so a resumed run replaces ``model.pt`` only with a better model."""
        if state_dict:
            super().load_state_dict(state_dict)

    def adopt_interval_files(self, saved: list[tuple[int, str]]) -> None:
        """Count ``(epoch, file name)`` checkpoints of an earlier run toward ``n_saved``, so rotation removes them."""
        if self._interval_checkpoint is not None:
            # Ignite names the single key of this state "_saved" in 0.5 and "saved" in its docs; reuse whichever.
            state = self._interval_checkpoint.state_dict()
            state[next(iter(state))] = sorted(saved)
            self._interval_checkpoint.load_state_dict(state)
