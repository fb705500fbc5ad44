"""Resumable training: atomic checkpoint files, random-state round trips, DDP and bare decoder checkpoints, and a
real training run killed with SIGKILL mid-epoch and resumed, compared with uninterrupted runs of the same seed.

The bundle imports :class:`PauseAtIteration` from this module in the run that gets killed, so the module must stay
importable without pytest fixtures running.
"""

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from ignite.engine import Engine, Events
from synthetic_cases import write_cases

from scripts.atomic_checkpoint import AtomicCheckpointSaver, AtomicDiskSaver, write_atomic
from scripts.decoder_checkpoint import DecoderCheckpoint, read_checkpoint
from scripts.network import CalSAMNet
from scripts.resume import RandomState, attach_train_state, find_latest_checkpoint, resolve_resume_path

BUNDLE = Path(__file__).resolve().parents[1] / "calsam_bundle"
TESTS = Path(__file__).resolve().parent


class PauseAtIteration:
    """Test handler: at one training iteration, write a marker file and sleep so the test can kill the process."""

    def __init__(self, marker: str, epoch: int, iteration: int, seconds: float = 300.0) -> None:
        self.marker = Path(marker)
        self.epoch = epoch
        self.iteration = iteration
        self.seconds = seconds

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        local_iteration = (engine.state.iteration - 1) % engine.state.epoch_length + 1
        if engine.state.epoch == self.epoch and local_iteration == self.iteration:
            self.marker.write_text(f"{engine.state.epoch} {engine.state.iteration}")
            time.sleep(self.seconds)


class Unpicklable:
    """An object whose serialisation fails, to interrupt ``torch.save`` in the middle of a write."""

    def __reduce__(self):
        raise RuntimeError("this object cannot be saved")


def _draws(generator: torch.Generator) -> tuple:
    return (
        random.random(),
        float(np.random.rand()),
        float(torch.rand(())),
        float(torch.rand((), generator=generator)),
    )


def test_random_state_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(5)
    state = RandomState({"prompt": generator})
    state.capture()
    write_atomic({"rng": state.state_dict()}, tmp_path / "rng.pt")
    expected = _draws(generator)
    # Move every generator on before restoring.
    _draws(generator)
    loaded = torch.load(tmp_path / "rng.pt", map_location="cpu", weights_only=True)
    state.load_state_dict(loaded["rng"])
    assert _draws(generator) == expected


def test_random_state_rejects_missing_generator():
    saved = RandomState({}).state_dict()
    with pytest.raises(ValueError, match="prompt"):
        RandomState({"prompt": torch.Generator()}).load_state_dict(saved)


def test_failed_write_keeps_previous_file(tmp_path):
    saver = AtomicDiskSaver(tmp_path)
    saver({"value": torch.tensor([1.0])}, "state.pt")
    with pytest.raises(RuntimeError, match="cannot be saved"):
        saver({"value": torch.tensor([2.0]), "broken": Unpicklable()}, "state.pt")
    assert torch.equal(torch.load(tmp_path / "state.pt", weights_only=True)["value"], torch.tensor([1.0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_old_file_removed_only_after_new_write(tmp_path):
    saver = AtomicDiskSaver(tmp_path)
    saver({"epoch": 1}, "checkpoint_epoch=1.pt")
    saver.remove("checkpoint_epoch=1.pt")
    assert (tmp_path / "checkpoint_epoch=1.pt").is_file()
    saver({"epoch": 2}, "checkpoint_epoch=2.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]


def test_fixed_name_replaced_not_deleted(tmp_path):
    saver = AtomicDiskSaver(tmp_path, filename="model.pt")
    saver({"score": 1}, "ignored.pt")
    saver.remove("ignored.pt")
    saver({"score": 2}, "ignored.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    assert torch.load(tmp_path / "model.pt", weights_only=True) == {"score": 2}


def _score(saver: AtomicCheckpointSaver, value: float) -> None:
    engine = Engine(lambda engine, batch: None)
    engine.state.metrics = {"dice": value}
    saver.metrics_completed(engine)


def test_key_metric_record_survives_resume(tmp_path):
    weights = torch.nn.Linear(1, 1)

    def make_saver():
        return AtomicCheckpointSaver(
            str(tmp_path),
            {"model": weights},
            save_key_metric=True,
            key_metric_name="dice",
            key_metric_filename="model.pt",
        )

    first = make_saver()
    _score(first, 0.8)
    saved_bias = weights.bias.detach().clone()
    resumed = make_saver()
    resumed.load_state_dict(first.state_dict())
    with torch.no_grad():
        weights.bias.add_(1.0)
    _score(resumed, 0.5)
    # The worse model did not replace the best one.
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["bias"], saved_bias)
    _score(resumed, 0.9)
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["bias"], weights.bias.detach())


def test_latest_readable_checkpoint_found(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    for epoch in (1, 2):
        write_atomic({"epoch": epoch}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    (tmp_path / "checkpoint_epoch=10.pt").write_bytes(b"truncated")
    (tmp_path / ".checkpoint_epoch=11.pt.abc.tmp").write_bytes(b"partial")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=2.pt"


def test_resume_setting_rules(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume: auto"):
        resolve_resume_path(True, tmp_path)
    assert resolve_resume_path("auto", tmp_path) is None
    write_atomic({"epoch": 1}, tmp_path / "checkpoint_epoch=1.pt")
    assert resolve_resume_path(False, tmp_path) is None
    assert resolve_resume_path("auto", tmp_path) == tmp_path / "checkpoint_epoch=1.pt"
    assert resolve_resume_path(True, tmp_path) == tmp_path / "checkpoint_epoch=1.pt"
    for invalid in ("yes", 1, None):
        with pytest.raises(ValueError, match="resume must be one of"):
            resolve_resume_path(invalid, tmp_path)


def _engine_run(save_dir: Path, max_epochs: int, resume) -> tuple[Engine, torch.nn.Linear]:
    """Run a tiny engine that adds 1 to a weight per iteration, with its state saved and optionally resumed."""
    weights = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(weights.weight)

    def step(engine, batch):
        with torch.no_grad():
            weights.weight.add_(1.0)

    engine = Engine(step)
    attach_train_state(engine, {"trainer": engine, "weights": weights}, save_dir, resume=resume, n_saved=1)
    engine.run([0, 1], max_epochs=max_epochs)
    return engine, weights


def test_engine_resumes_and_rotates_files(tmp_path):
    _engine_run(tmp_path, max_epochs=2, resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]
    engine, weights = _engine_run(tmp_path, max_epochs=4, resume=True)
    # Epochs 3 and 4 ran on top of the 2 restored epochs: 2 iterations each, one increment per iteration.
    assert engine.state.epoch == 4
    assert float(weights.weight.detach()) == 8.0
    # With n_saved=1 the adopted epoch-2 file was rotated out too.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=4.pt"]


def test_fresh_start_sets_old_files_aside(tmp_path):
    _engine_run(tmp_path, max_epochs=3, resume=False)
    (tmp_path / "checkpoint_epoch=9.pt").write_bytes(b"damaged")
    engine, weights = _engine_run(tmp_path, max_epochs=1, resume=False)
    assert float(weights.weight.detach()) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt", "previous"]
    assert sorted(p.name for p in (tmp_path / "previous").iterdir()) == [
        "checkpoint_epoch=3.pt",
        "checkpoint_epoch=9.pt",
    ]


def test_resume_skips_damaged_newest_file(tmp_path):
    _engine_run(tmp_path, max_epochs=1, resume=False)
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(b"damaged")
    engine, weights = _engine_run(tmp_path, max_epochs=2, resume="auto")
    assert float(weights.weight.detach()) == 4.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt", "previous"]


@pytest.fixture
def single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _decoder_equal(a: CalSAMNet, b: CalSAMNet) -> bool:
    state_b = b.sam.mask_decoder.state_dict()
    return all(torch.equal(value, state_b[key]) for key, value in a.sam.mask_decoder.state_dict().items())


def test_decoder_checkpoint_between_ddp_and_bare(single_process_group):
    trained = CalSAMNet("small", 64, None, 3, init_seed=1)
    with torch.no_grad():
        for parameter in trained.trainable_parameters():
            parameter.add_(0.5)
    wrapped = torch.nn.parallel.DistributedDataParallel(trained)
    bare = CalSAMNet("small", 64, None, 3, init_seed=1)
    assert not _decoder_equal(trained, bare)

    # DDP-wrapped to bare.
    DecoderCheckpoint(bare).load_state_dict(DecoderCheckpoint(wrapped).state_dict())
    assert _decoder_equal(trained, bare)

    # Bare to DDP-wrapped.
    target = CalSAMNet("small", 64, None, 3, init_seed=1)
    target_wrapped = torch.nn.parallel.DistributedDataParallel(target)
    DecoderCheckpoint(target_wrapped).load_state_dict(DecoderCheckpoint(bare).state_dict())
    assert _decoder_equal(trained, target)

    # Decoder keys saved from a DDP-wrapped decoder carry "module." and still load into a bare network.
    state = DecoderCheckpoint(wrapped).state_dict()
    state["mask_decoder"] = {f"module.{key}": value for key, value in state["mask_decoder"].items()}
    fresh = CalSAMNet("small", 64, None, 3, init_seed=1)
    DecoderCheckpoint(fresh).load_state_dict(state)
    assert _decoder_equal(trained, fresh)

    # A state whose keys match nothing is an error, not a silent no-op.
    state["mask_decoder"] = {f"decoder.{key}": value for key, value in state["mask_decoder"].items()}
    with pytest.raises(ValueError, match="No decoder key"):
        DecoderCheckpoint(fresh).load_state_dict(state)


# A real training run, killed and resumed.

MAX_EPOCHS = 2


def _override(root: Path, datalist: str, **extra) -> Path:
    content = {
        "bundle_root": str(root),
        "datalist": datalist,
        "source_domains": ["scanner_a", "scanner_b"],
        "val_fraction": 0.25,
        "test_fraction": 0.0,
        "device": "$torch.device('cpu')",
        "sam_variant": "small",
        "sam_image_size": 64,
        "sam_checkpoint": None,
        "max_epochs": MAX_EPOCHS,
        # One file kept: the kill and the resume then also check that old files are replaced, never lost.
        "train_state#n_saved": 1,
        # The mean squared error of the probabilities (Brier score) moves with every weight update, unlike Dice
        # after thresholding on this tiny model.
        "validate#evaluator#additional_metrics": {
            "val_mse": {"_target_": "MeanSquaredError", "output_transform": "$lambda out: (out['pred'], out['label'])"}
        },
        # Penalties that draw from the global torch generator and a schedule that depends on the iteration, so a
        # resume that restored either wrongly would change the weights.
        "fip#warmup_epochs": 0,
        "fip#estimator": "finite_difference",
        "fip#fisher": "sampled",
        "cmp#warmup_epochs": 1,
        **extra,
    }
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def _start(overrides: list[Path], log: Path) -> subprocess.Popen:
    configs = [str(BUNDLE / "configs" / "train.yaml"), *map(str, overrides)]
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(configs)]
    command += ["--logging_file", str(BUNDLE / "configs" / "logging.conf")]
    # One thread per process keeps the arithmetic identical between runs and the three runs off each other's cores.
    environment = dict(os.environ, PYTHONPATH=f"{BUNDLE}{os.pathsep}{TESTS}", OMP_NUM_THREADS="1")
    return subprocess.Popen(command, cwd=BUNDLE, env=environment, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    assert process.wait(timeout=timeout) == 0, log.read_text()[-4000:]


def _final_state(root: Path) -> dict:
    return torch.load(root / "models" / "train_state" / f"checkpoint_epoch={MAX_EPOCHS}.pt", weights_only=True)


def _validation_mse(root: Path) -> dict[int, float]:
    with sqlite3.connect(root / "eval" / "mlruns.db") as database:
        rows = database.execute("SELECT step, value FROM metrics WHERE key = 'val_mse'").fetchall()
    return {int(step): float(value) for step, value in rows}


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_same_tree(a, b, where: str = "") -> None:
    """Compare nested dicts and lists of tensors and plain values exactly."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for index, (left, right) in enumerate(zip(a, b)):
            _assert_same_tree(left, right, f"{where}/{index}")
    else:
        assert a == b, where


def _load_written_files(root: Path, names: list[str]) -> dict:
    """Load every checkpoint and cache entry under ``root``; a damaged file raises."""
    loaded = {"train_state": {}, "cache_entries": 0}
    for name in names:
        path = root / name
        if name.startswith("models/train_state/"):
            loaded["train_state"][path.name] = torch.load(path, map_location="cpu", weights_only=True)
        elif name == "models/model.pt":
            loaded["model"] = read_checkpoint(path)
        elif name.endswith(".npy"):
            assert np.load(path).shape[0] == 256, name
            loaded["cache_entries"] += 1
    return loaded


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    datalist = write_cases(folder / "data", count=4, shape=(16, 16, 8), spacing=(4.0, 4.0, 4.0))
    roots = {name: folder / name for name in ("clean", "repeat", "killed")}
    logs = {name: folder / f"{name}.log" for name in (*roots, "resumed")}
    marker = folder / "paused"
    probe = {
        "pause_probe": {"_target_": "test_resume.PauseAtIteration", "marker": str(marker), "epoch": 2, "iteration": 2},
        "train#trainer#train_handlers": "$@train#handlers + [@pause_probe]",
    }
    processes = {
        "clean": _start([_override(roots["clean"], datalist)], logs["clean"]),
        "repeat": _start([_override(roots["repeat"], datalist)], logs["repeat"]),
        "killed": _start([_override(roots["killed"], datalist, **probe)], logs["killed"]),
    }
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert processes["killed"].poll() is None, logs["killed"].read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never reached epoch 2"
            time.sleep(0.5)
        checkpoints_at_kill = sorted(p.name for p in (roots["killed"] / "models" / "train_state").iterdir())
        processes["killed"].send_signal(signal.SIGKILL)
        killed_code = processes["killed"].wait(timeout=60)
        files_at_kill = sorted(str(p.relative_to(roots["killed"])) for p in roots["killed"].rglob("*") if p.is_file())
        loaded_at_kill = _load_written_files(roots["killed"], files_at_kill)
        processes["resumed"] = _start([_override(roots["killed"], datalist, resume=True)], logs["resumed"])
        for name in ("clean", "repeat", "resumed"):
            _wait(processes[name], logs[name])
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    return {
        "roots": roots,
        "killed_code": killed_code,
        "checkpoints_at_kill": checkpoints_at_kill,
        "files_at_kill": files_at_kill,
        "loaded_at_kill": loaded_at_kill,
        "resumed_log": logs["resumed"].read_text(),
    }


def test_same_seed_gives_same_weights_and_metrics(runs):
    clean, repeat = _final_state(runs["roots"]["clean"]), _final_state(runs["roots"]["repeat"])
    _assert_same_tensors(clean["decoder"]["mask_decoder"], repeat["decoder"]["mask_decoder"])
    mse = _validation_mse(runs["roots"]["clean"])
    assert sorted(mse) == list(range(1, MAX_EPOCHS + 1))
    assert mse == _validation_mse(runs["roots"]["repeat"])


def test_kill_leaves_written_files_intact(runs):
    assert runs["killed_code"] == -signal.SIGKILL
    # Epoch 1 was saved; epoch 2 was in progress.
    assert runs["checkpoints_at_kill"] == ["checkpoint_epoch=1.pt"]
    assert not [name for name in runs["files_at_kill"] if name.endswith(".tmp")]
    loaded = runs["loaded_at_kill"]
    state = loaded["train_state"]["checkpoint_epoch=1.pt"]
    assert state["trainer"]["iteration"] == state["trainer"]["epoch_length"]
    assert loaded["model"]["format"] == "calsam-decoder-v1"
    assert loaded["cache_entries"] > 0


def test_resumed_run_matches_uninterrupted_run(runs):
    assert "Resuming training from" in runs["resumed_log"]
    root, clean_root = runs["roots"]["killed"], runs["roots"]["clean"]
    # n_saved=1: the epoch-1 file of the killed run was replaced by the resumed run's last file.
    saved = sorted(p.name for p in (root / "models" / "train_state").iterdir())
    assert saved == [f"checkpoint_epoch={MAX_EPOCHS}.pt"]
    resumed, clean = _final_state(root), _final_state(clean_root)
    assert resumed["trainer"] == clean["trainer"]
    _assert_same_tensors(resumed["decoder"]["mask_decoder"], clean["decoder"]["mask_decoder"])
    _assert_same_tree(resumed["optimizer"], clean["optimizer"], "optimizer")
    assert resumed["lr_scheduler"] == clean["lr_scheduler"]
    assert resumed["validation"] == clean["validation"]
    best_resumed = read_checkpoint(root / "models" / "model.pt")["mask_decoder"]
    _assert_same_tensors(best_resumed, read_checkpoint(clean_root / "models" / "model.pt")["mask_decoder"])
    # The killed run logged epoch 1 and the resumed run, a new MLflow run, epoch 2: the uninterrupted run's values.
    assert _validation_mse(root) == _validation_mse(clean_root)
