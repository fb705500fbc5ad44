"""Multi-process training on CPU with torchrun and gloo: rank helpers, the embedding cache under concurrent writers,
FIP gradients under DDP, and a 2-rank bundle run compared with a single process that takes the same global batches.

The single-process reference imports :class:`InterleavedShardSampler` and :class:`AccumulatingOptimizer` from this
module, so it must stay importable without pytest fixtures running.
"""

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ignite.engine import Engine
from monai.handlers import StatsHandler
from synthetic_cases import write_cases
from torch.utils.data.distributed import DistributedSampler

from scripts.atomic_checkpoint import AtomicCheckpointSaver
from scripts.cases import load_datalist, prepare_case
from scripts.distributed import (
    CaseCoverageHandler,
    backend_for,
    get_rank,
    get_world_size,
    handlers_for_rank,
    select_device,
    setup_distributed,
)
from scripts.embedding_store import EmbeddingStore
from scripts.evaluator import predict_volume
from scripts.network import CalSAMNet
from scripts.splits import domain_split

BUNDLE = Path(__file__).resolve().parents[1] / "calsam_bundle"
TESTS = Path(__file__).resolve().parent
SEED = 0


class InterleavedShardSampler(DistributedSampler):
    """Single-process sampler that yields, step by step, the slab each of ``num_replicas`` ranks would take.

    Step ``i`` of the ranks becomes positions ``num_replicas * i ... num_replicas * i + num_replicas - 1``, so with
    gradient accumulation over ``num_replicas`` iterations the optimizer steps on the same global batches as DDP.
    Subclassing ``DistributedSampler`` makes MONAI's workflow call ``set_epoch`` on it.
    """

    def __init__(self, dataset, num_replicas: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        self.shards = [
            DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
            for rank in range(num_replicas)
        ]

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for shard in self.shards:
            shard.set_epoch(epoch)

    def __iter__(self):
        per_rank = [list(shard) for shard in self.shards]
        return iter([index for step in zip(*per_rank) for index in step])

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)


class AccumulatingOptimizer:
    """Optimizer wrapper that steps every ``steps`` calls with the mean of the accumulated gradients.

    DDP averages the gradients of the ranks, so ``steps`` equal to the number of ranks reproduces its update.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int) -> None:
        self.optimizer = optimizer
        self.steps = steps
        self.calls = 0

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.calls % self.steps == 0:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.calls += 1
        if self.calls % self.steps:
            return
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    parameter.grad.div_(self.steps)
        self.optimizer.step()


def test_device_and_backend_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert select_device() == torch.device("cpu")
    assert backend_for("cpu") == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"
    monkeypatch.setenv("LOCAL_RANK", "first")
    with pytest.raises(ValueError, match="LOCAL_RANK must be an integer"):
        select_device()


def test_rank_from_environment_before_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (get_rank(), get_world_size()) == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (get_rank(), get_world_size()) == (3, 4)


def test_setup_outside_torchrun_names_launcher(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        setup_distributed()


def test_rank_zero_handlers_filtered(tmp_path):
    stats = StatsHandler()
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(1, 1)}, save_interval=1)
    coverage = CaseCoverageHandler()
    handlers = [stats, None, saver, coverage]
    assert handlers_for_rank(handlers, rank=0) == [stats, saver, coverage]
    assert handlers_for_rank(handlers, rank=1) == [coverage]


def _run_evaluator_epoch(handler: CaseCoverageHandler, case_ids: list[str]) -> Engine:
    engine = Engine(lambda engine, case_id: {"case_id": case_id})
    handler.attach(engine)
    engine.run(case_ids, max_epochs=1)
    return engine


def test_case_coverage_counts_and_rejects_repeats():
    engine = _run_evaluator_epoch(CaseCoverageHandler(expected=3), ["a", "b", "c"])
    assert engine.state.metrics["val_cases"] == 3
    with pytest.raises(ValueError, match=r"\['a'\] were evaluated more than once"):
        _run_evaluator_epoch(CaseCoverageHandler(), ["a", "b", "c", "a"])
    with pytest.raises(ValueError, match="expected 4"):
        _run_evaluator_epoch(CaseCoverageHandler(expected=4), ["a", "b", "c"])


class FakeEncoder:
    """Stands in for ``CalSAMNet`` in the store: a deterministic ``(B, 256, 4, 4)`` embedding per slice."""

    image_size = 64
    encoder_sha256 = "fake-encoder"

    def encode(self, slices: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        b = slices.shape[0]
        means = slices.float().flatten(1).mean(dim=1)
        return means.view(b, 1, 1, 1) + torch.arange(256 * 16, dtype=torch.float32).view(1, 256, 4, 4)


def _slices() -> torch.Tensor:
    return (torch.arange(12).view(12, 1, 1, 1) * 10 + torch.zeros(12, 3, 8, 8)).float()


def _write_same_keys(cache_dir: str, barrier, rounds: int) -> None:
    barrier.wait()
    for round_number in range(rounds):
        store = EmbeddingStore(FakeEncoder(), f"{cache_dir}/round{round_number}", "float32", keep_in_memory=False)
        store.get(_slices())


def test_embedding_cache_survives_concurrent_writers(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    rounds = 5
    workers = [context.Process(target=_write_same_keys, args=(str(tmp_path), barrier, rounds)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    assert not list(tmp_path.rglob("*.tmp"))
    expected = FakeEncoder().encode(_slices())
    for round_number in range(rounds):
        store = EmbeddingStore(FakeEncoder(), str(tmp_path / f"round{round_number}"), "float32")
        assert torch.equal(torch.as_tensor(store.get(_slices())[:]), expected)
        assert store.computed == 0
        assert store.reused == len(expected)


GRADIENT_PROBE = """
import json, sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from scripts.fip import fisher_trace_exact, fisher_trace_finite_difference, fisher_trace_subbatch
from scripts.network import CalSAMNet

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0], [2.0, 6.0, 14.0, 28.0], [8.0, 8.0, 24.0, 24.0]])


def inputs(r):
    features = torch.randn(2, 256, 4, 4, generator=torch.Generator().manual_seed(10 + r))
    # Rank 0 runs the hypernetworks of regions 0 and 1, rank 1 that of region 2 only.
    regions = torch.tensor([0, 1, 1]) if r == 0 else torch.tensor([2, 2, 2])
    return features, regions


def gradients(model, core, features, regions, estimator, r):
    features = features.clone().requires_grad_(True)
    pairs = torch.tensor([0, 1, 1])

    def decode(slab, index=None):
        chosen = slice(None) if index is None else index
        return model(slab[pairs[chosen]], regions[chosen], boxes=boxes[chosen], native_hw=(32, 32))

    logits = decode(features)
    roi = torch.ones_like(logits)
    target = (torch.arange(logits.numel()).view_as(logits) % 3 == 0).float()
    generator = torch.Generator().manual_seed(100 + r)
    if estimator == "exact":
        fip = fisher_trace_exact(logits, features, roi, fisher="empirical", target=target)
    elif estimator == "finite_difference":
        fip = fisher_trace_finite_difference(decode, features, logits, roi, generator=generator)
    else:
        fip = fisher_trace_subbatch(decode, features, logits, roi, fraction=0.5, fisher="sampled", generator=generator)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + 10.0 * fip
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in core.trainable_parameters()]
    core.zero_grad(set_to_none=True)
    return grads


result = {}
for estimator in ("exact", "finite_difference", "subbatch"):
    network = CalSAMNet("small", 64, None, 3, init_seed=0)
    wrapped = torch.nn.parallel.DistributedDataParallel(network, find_unused_parameters=True)
    synced = gradients(wrapped, network, *inputs(rank), estimator, rank)
    if rank == 0:
        reference = CalSAMNet("small", 64, None, 3, init_seed=0)
        per_rank = [gradients(reference, reference, *inputs(r), estimator, r) for r in range(world)]
        difference, largest, none_match = 0.0, 0.0, True
        for index, value in enumerate(synced):
            parts = [grads[index] for grads in per_rank]
            if all(part is None for part in parts):
                none_match &= value is None
                continue
            mean = sum(part for part in parts if part is not None) / world
            difference = max(difference, float((value - mean).abs().max()))
            largest = max(largest, float(mean.abs().max()))
        result[estimator] = {"difference": difference, "largest": largest, "none_match": none_match}
if rank == 0:
    with open(sys.argv[2], "w") as stream:
        json.dump(result, stream)
dist.destroy_process_group()
"""


def _torchrun(arguments: list[str], log_dir: Path, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["--log-dir", str(log_dir), "--redirects", "3", *arguments]
    environment = dict(os.environ, PYTHONPATH=f"{BUNDLE}{os.pathsep}{TESTS}", OMP_NUM_THREADS="1")
    return subprocess.Popen(command, cwd=BUNDLE, env=environment, **popen)


def _rank_log(log_dir: Path, rank: int, stream: str = "stdout") -> str:
    return "\n".join(path.read_text() for path in sorted(log_dir.rglob(f"attempt_*/{rank}/{stream}.log")))


def _ddp_override(root: Path, datalist: str, **extra) -> Path:
    content = {
        "bundle_root": str(root),
        "datalist": datalist,
        "source_domains": ["scanner_a", "scanner_b"],
        # 5 cases: 3 for validation, an odd number for 2 ranks, and 2 for training.
        "val_fraction": 0.6,
        "test_fraction": 0.0,
        "sam_variant": "small",
        "sam_image_size": 64,
        "sam_checkpoint": None,
        "max_epochs": 2,
        "seed": SEED,
        # Both runs must compute the same gradients, so prompts and penalties are deterministic. There is no box
        # jitter, and the exact (double-backward) FIP uses the empirical Fisher, whose labels come from the target.
        # There is no warm-up either, because its per-iteration ramp depends on the epoch length, which differs.
        "box_jitter": 0.0,
        "train#trainer#box_jitter_pixels": 0.0,
        "fip#warmup_epochs": 0,
        "fip#estimator": "exact",
        "fip#fisher": "empirical",
        "cmp#warmup_epochs": 0,
        "validate#evaluator#additional_metrics": {
            "val_mse": {"_target_": "MeanSquaredError", "output_transform": "$lambda out: (out['pred'], out['label'])"}
        },
        **extra,
    }
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    datalist = write_cases(folder / "data", count=5, shape=(16, 16, 8), spacing=(4.0, 4.0, 4.0))
    configs = [str(BUNDLE / "configs" / "train.yaml"), str(BUNDLE / "configs" / "multi_gpu_train.yaml")]
    ddp_override = _ddp_override(folder / "ddp", datalist)
    ddp_arguments = ["-m", "monai.bundle", "run", "training", "--config_file", str([*configs, str(ddp_override)])]
    reference_override = _ddp_override(
        folder / "single",
        datalist,
        device="$torch.device('cpu')",
        **{
            "train#dataloader#sampler": {
                "_target_": "test_distributed.InterleavedShardSampler",
                "dataset": "@train#dataset",
                "num_replicas": 2,
                "seed": "@seed",
            },
            "train#dataloader#shuffle": False,
            "train#trainer#optimizer": {
                "_target_": "test_distributed.AccumulatingOptimizer",
                "optimizer": "@optimizer",
                "steps": 2,
            },
        },
    )
    reference_command = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str([configs[0], str(reference_override)]),
    ]  # fmt: skip
    probe_script = folder / "gradient_probe.py"
    probe_script.write_text(GRADIENT_PROBE)
    probe_result = folder / "gradients.json"

    logs = {name: folder / f"{name}.log" for name in ("ddp", "single", "probe")}
    environment = dict(os.environ, PYTHONPATH=f"{BUNDLE}{os.pathsep}{TESTS}", OMP_NUM_THREADS="1")
    processes = {
        "ddp": _torchrun(ddp_arguments, folder / "ddp_logs", stdout=logs["ddp"].open("w"), stderr=subprocess.STDOUT),
        "single": subprocess.Popen(
            reference_command, cwd=BUNDLE, env=environment, stdout=logs["single"].open("w"), stderr=subprocess.STDOUT
        ),
        "probe": _torchrun(
            [str(probe_script), str(BUNDLE), str(probe_result)],
            folder / "probe_logs",
            stdout=logs["probe"].open("w"),
            stderr=subprocess.STDOUT,
        ),
    }
    try:
        for name, process in processes.items():
            failure = logs[name].read_text()[-3000:] if process.wait(timeout=900) else ""
            if name != "single" and failure:
                failure += _rank_log(folder / f"{name}_logs", 0, "stderr")[-3000:]
            assert not failure, f"{name} run failed:\n{failure}"
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    return {
        "folder": folder,
        "datalist": datalist,
        "rank0": _rank_log(folder / "ddp_logs", 0),
        "rank1": _rank_log(folder / "ddp_logs", 1),
        "gradients": json.loads(probe_result.read_text()),
    }


def test_fip_gradients_synchronised_under_ddp(ddp_runs):
    for estimator, result in ddp_runs["gradients"].items():
        # DDP's average of the two ranks' gradients equals the mean of gradients computed without DDP.
        assert result["largest"] > 0, estimator
        assert result["difference"] <= 1e-7 * result["largest"], estimator
        assert result["none_match"], estimator


def test_only_rank_zero_writes(ddp_runs):
    rank0, rank1 = ddp_runs["rank0"], ddp_runs["rank1"]
    assert "backend gloo" in rank0
    assert "Wrote checkpoint" in rank0
    assert "Wrote checkpoint" not in rank1
    root = ddp_runs["folder"] / "ddp"
    assert sorted(p.name for p in (root / "models" / "train_state").iterdir()) == [
        "checkpoint_epoch=1.pt",
        "checkpoint_epoch=2.pt",
    ]
    with sqlite3.connect(root / "eval" / "mlruns.db") as database:
        assert database.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
        repeated = database.execute(
            "SELECT COUNT(*) FROM (SELECT key, step FROM metrics GROUP BY key, step HAVING COUNT(*) > 1)"
        ).fetchone()[0]
        assert repeated == 0


def _final_decoder(root: Path) -> dict:
    state = torch.load(root / "models" / "train_state" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    return state["decoder"]["mask_decoder"]


def test_ddp_matches_accumulating_single_process(ddp_runs):
    ddp = _final_decoder(ddp_runs["folder"] / "ddp")
    single = _final_decoder(ddp_runs["folder"] / "single")
    first_epoch = torch.load(
        ddp_runs["folder"] / "ddp" / "models" / "train_state" / "checkpoint_epoch=1.pt", weights_only=True
    )["decoder"]["mask_decoder"]
    difference = max(float((ddp[key] - single[key]).abs().max()) for key in ddp)
    movement = max(float((ddp[key] - first_epoch[key]).abs().max()) for key in ddp)
    # Tolerance: float32 rounding of the same sums; measured 0 on this CPU. The second epoch moved the weights far
    # more, so a different batch composition would fail.
    assert movement > 1e-6
    assert difference <= 1e-6


def test_validation_metric_gathered_over_all_cases(ddp_runs):
    root = ddp_runs["folder"] / "ddp"
    with sqlite3.connect(root / "eval" / "mlruns.db") as database:
        logged = dict(database.execute("SELECT step, value FROM metrics WHERE key = 'val_mse'").fetchall())
        cases = dict(database.execute("SELECT step, value FROM metrics WHERE key = 'val_cases'").fetchall())
    assert cases == {1: 3.0, 2: 3.0}

    # Recompute the last validation here, in one process, from the decoder it used.
    network = CalSAMNet("small", 64, None, 3, init_seed=SEED)
    network.sam.mask_decoder.load_state_dict(_final_decoder(root))
    store = EmbeddingStore(network, str(root / "cache" / "embeddings"), "float16")
    items = load_datalist(ddp_runs["datalist"])
    validation = domain_split(items, ["scanner_a", "scanner_b"], val_fraction=0.6, test_fraction=0.0, seed=SEED)["val"]
    assert len(validation) == 3
    per_case = []
    for item in validation:
        case = prepare_case(item, store, image_channels=[3, 1, 2], keep_volume=True)
        prob = predict_volume(network, case)["prob"].double()
        per_case.append(float((prob - case["volume_regions"].double()).pow(2).mean()))

    def mean_over(order: list[int]) -> float:
        return sum(per_case[i] for i in order) / len(order)

    everything = mean_over([0, 1, 2])
    assert logged[2] == pytest.approx(everything, rel=1e-5)
    # Rank 0 alone evaluates cases 0 and 2, and torch's padded sampler would count case 0 twice. Both means differ.
    assert abs(mean_over([0, 2]) - everything) > 1e-5
    assert abs(mean_over([0, 1, 2, 0]) - everything) > 1e-5
