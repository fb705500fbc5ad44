"""Multi-process training with ``torchrun``: process group, device, DDP wrapper, rank helpers and gathering.

``configs/multi_gpu_train.yaml`` uses these helpers. Every process runs the whole bundle config; ``torchrun`` sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without a process group (a plain
``python -m monai.bundle run``) the rank helpers report rank 0 of 1 and the gathering helpers return local results,
so the same code serves single-process runs.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
from collections import Counter
from collections.abc import Sequence

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers import CheckpointSaver, MLFlowHandler, StatsHandler, TensorBoardStatsHandler

from .cases import prepare_cases
from .embedding_store import EmbeddingStore

logger = logging.getLogger(__name__)

REQUIRED_ENVIRONMENT = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Handlers that write files, logs or MLflow entries; on ranks other than 0 they would duplicate rank 0's output.
RANK_ZERO_HANDLERS: tuple[type, ...] = (
    StatsHandler,
    MLFlowHandler,
    CheckpointSaver,
    TensorBoardStatsHandler,
    ProgressBar,
)


def _group_started() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process.

    Before the process group starts, the ``RANK`` variable that torchrun sets; 0 outside torchrun. Config entries
    that must not be built on other ranks (the MLflow handlers, whose constructors migrate the tracking database)
    can therefore test the rank before the group exists.
    """
    return dist.get_rank() if _group_started() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    """Number of processes: the group's size, or the ``WORLD_SIZE`` variable before it starts, 1 outside torchrun."""
    return dist.get_world_size() if _group_started() else int(os.environ.get("WORLD_SIZE", 1))


def is_rank_zero() -> bool:
    """Return whether this process is rank 0, the one that writes checkpoints, reports and MLflow entries."""
    return get_rank() == 0


def select_device(local_rank: int | None = None) -> torch.device:
    """Return ``cuda:LOCAL_RANK`` when CUDA is available, otherwise the CPU.

    Args:
        local_rank: rank of the process on its machine; read from the ``LOCAL_RANK`` variable when None (0 when
            the variable is not set).

    Raises:
        ValueError: ``LOCAL_RANK`` is not an integer, or there are fewer GPUs than processes on this machine.
    """
    if local_rank is None:
        text = os.environ.get("LOCAL_RANK", "0")
        try:
            local_rank = int(text)
        except ValueError:
            raise ValueError(f"LOCAL_RANK must be an integer, got {text!r}; launch the bundle with torchrun.") from None
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        raise ValueError(
            f"LOCAL_RANK {local_rank} has no GPU: this machine has {count}. Start at most {count} processes per "
            "node (torchrun --nproc_per_node)."
        )
    return torch.device(f"cuda:{local_rank}")


def backend_for(device: torch.device | str) -> str:
    """Collective backend for a device type: NCCL for CUDA, gloo for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def setup_distributed(timeout_minutes: float = 60.0) -> torch.device:
    """Choose this process's device, start the process group on it and return the device.

    The backend follows the device (NCCL on GPUs, gloo on CPUs), so the same config runs on both. The default
    timeout is longer than PyTorch's because ranks wait at a barrier while others embed their share of the data.
    A second call returns the device without starting another group.

    Args:
        timeout_minutes: how long a collective waits for the other ranks before failing.

    Raises:
        ValueError: a variable that torchrun sets is missing, so the process was not started by torchrun.
    """
    missing = [name for name in REQUIRED_ENVIRONMENT if name not in os.environ]
    if missing:
        raise ValueError(
            f"Environment variables {missing} are not set; start multi-process training with torchrun, for example "
            "torchrun --nproc_per_node 2 -m monai.bundle run training --config_file "
            "\"['configs/train.yaml','configs/multi_gpu_train.yaml']\"."
        )
    device = select_device()
    if dist.is_initialized():
        return device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    logger.info(
        "Process group started: rank %d of %d, backend %s, device %s.", get_rank(), get_world_size(), backend, device
    )
    return device


def teardown_distributed() -> None:
    """Wait for all ranks, then destroy the process group; does nothing without one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_distributed(network: torch.nn.Module, device: torch.device | str) -> torch.nn.parallel.DistributedDataParallel:
    """Wrap the network in ``DistributedDataParallel`` for training.

    ``find_unused_parameters`` is on because the decoder never runs its IoU head, and each slab runs only the
    hypernetworks of the regions it contains. Buffer synchronisation in the forward is off: the only buffer (the
    prompt encoder's positional frequencies) is frozen, and a broadcast in every forward would make the evaluator,
    whose ranks run different numbers of cases, wait for ranks that have finished.
    """
    device = torch.device(device)
    options = {"device_ids": [device.index] if device.type == "cuda" else None, "find_unused_parameters": True}
    # torch 2.14 renamed broadcast_buffers to forward_sync_buffers; both switch off the per-forward broadcast.
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters:
        options["forward_sync_buffers"] = False
    else:
        options["broadcast_buffers"] = False
    return torch.nn.parallel.DistributedDataParallel(network, **options)


def handlers_for_rank(
    handlers: Sequence, rank: int | None = None, rank_zero_types: tuple[type, ...] = RANK_ZERO_HANDLERS
) -> list:
    """Drop None entries, and on ranks other than 0 the handlers that only rank 0 runs (logging, MLflow, checkpoints).

    Args:
        handlers: the handler objects of a trainer or evaluator.
        rank: the process rank; the current one when None.
        rank_zero_types: handler classes kept on rank 0 only; subclasses count too.
    """
    rank = get_rank() if rank is None else rank
    # Components disabled in the config (``_disabled_``) arrive as None.
    handlers = [handler for handler in handlers if handler is not None]
    if rank == 0:
        return handlers
    return [handler for handler in handlers if not isinstance(handler, rank_zero_types)]


def all_gather_objects(value: object) -> list:
    """Return the list of ``value`` from every rank, in rank order; ``[value]`` without a process group."""
    if not _group_started() or dist.get_world_size() == 1:
        return [value]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def prepare_cases_sharded(items: list[dict], store: EmbeddingStore, **kwargs) -> list[dict]:
    """Prepare every item on every rank, embedding each slice on one rank only.

    Each rank first prepares its share ``items[rank::world_size]``, which writes the embeddings to the store's
    disk cache. After a barrier every rank prepares all items and reads the others' embeddings from the cache.
    Entries are written under a unique temporary name and renamed, so two ranks writing one key leave one whole
    entry. A rank that cannot see another rank's cache (no ``cache_dir``, or a per-node folder) recomputes the
    missing slices, so the result never depends on a shared folder.

    Args:
        items: datalist entries.
        store: the embedding store; it needs a ``cache_dir`` for the sharing to save work.
        kwargs: passed to ``cases.prepare_cases``.
    """
    rank, world_size = get_rank(), get_world_size() if _group_started() else 1
    if world_size > 1 and store.cache_dir is not None:
        description = kwargs.pop("description", "Preparing cases")
        prepare_cases(items[rank::world_size], store, description=f"{description} (rank {rank} share)", **kwargs)
        dist.barrier()
        kwargs["description"] = description
    elif world_size > 1:
        logger.warning("The embedding store has no cache_dir, so every rank embeds every slice itself.")
    return prepare_cases(items, store, **kwargs)


class CaseCoverageHandler:
    """Check at the end of each evaluator epoch that no rank evaluated a case that another rank also evaluated.

    PyTorch's ``DistributedSampler`` pads the last shard by repeating cases, which would count them twice in
    gathered metrics; ``monai.data.DistributedSampler(even_divisible=False)`` does not. The handler gathers the
    ``case_id`` of every iteration from all ranks, stores the number of distinct cases in
    ``engine.state.metrics[metric_name]`` so that loggers attached after it record it, and raises on a repeat.

    Args:
        metric_name: key of the case count in ``engine.state.metrics``.
        expected: number of cases the loader holds; a different count raises. None skips this check.

    Raises:
        ValueError: at the end of an epoch, when a case was evaluated twice or the count differs from ``expected``.
    """

    def __init__(self, metric_name: str = "val_cases", expected: int | None = None) -> None:
        self.metric_name = metric_name
        self.expected = expected
        self.case_ids: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check)

    def _reset(self, engine: Engine) -> None:
        self.case_ids = []

    def _record(self, engine: Engine) -> None:
        self.case_ids.append(str(engine.state.output["case_id"]))

    def _check(self, engine: Engine) -> None:
        gathered = [case_id for rank_ids in all_gather_objects(self.case_ids) for case_id in rank_ids]
        repeated = sorted(case_id for case_id, count in Counter(gathered).items() if count > 1)
        if repeated:
            raise ValueError(
                f"Cases {repeated} were evaluated more than once across {get_world_size()} ranks, which biases the "
                "gathered metrics. Use monai.data.DistributedSampler(even_divisible=False) for evaluation loaders."
            )
        if self.expected is not None and len(gathered) != self.expected:
            raise ValueError(f"{len(gathered)} cases were evaluated across all ranks, expected {self.expected}.")
        engine.state.metrics[self.metric_name] = len(gathered)
        if is_rank_zero():
            logger.info("Evaluated %d cases across %d ranks.", len(gathered), get_world_size())
