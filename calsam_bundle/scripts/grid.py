"""Run a benchmark grid (methods x seeds) through the bundle's own training and evaluation, then write the report.

From the bundle folder::

    python scripts/grid.py --grid configs/grid_phantom.yaml [--jobs 2] [--report-only]

Each (method, seed) run calls ``python -m monai.bundle run training`` and ``run evaluate`` in a subprocess with
the grid's config files plus a written override file (``runs/<method>/seed<k>/train.yaml`` and
``evaluate.yaml`` in the grid folder). The overrides give each run its own ``output_dir`` and ``ckpt_dir``, fix
``split_seed`` and ``network_seed`` for the whole grid, share one embedding cache and one corrupted-case folder,
and send every run to one MLflow experiment in ``<grid folder>/mlruns.db``.

The grid is resumable. A finished training writes ``trained.json`` and a finished evaluation ``done.json``
(both atomically), and a re-run skips those steps. A failed step is reported with its log file and the grid goes
on with the other runs. Methods with ``model_from`` evaluate another method's model (post-hoc temperature
scaling), so they wait for that training.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

if __package__ in (None, ""):
    # Run as a script (python scripts/grid.py): make the bundle folder importable as the package root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.grid_config import GridConfig, GridFileError, Method, load_grid  # noqa: E402
from scripts.tracking import write_json_atomic  # noqa: E402

logger = logging.getLogger("scripts.grid")
BUNDLE_DIR = Path(__file__).resolve().parents[1]


@dataclass
class GridRun:
    """One (method, seed) cell of the grid and where its files go."""

    method: Method
    seed: int
    folder: Path
    model_folder: Path

    @property
    def name(self) -> str:
        """Run name used in logs and MLflow, for example ``calsam-seed1``."""
        return f"{self.method.name}-seed{self.seed}"


def plan_runs(grid: GridConfig) -> list[GridRun]:
    """List the runs seed by seed, each method after the method whose model it reuses."""
    ordered = [m for m in grid.methods.values() if m.model_from is None]
    ordered += [m for m in grid.methods.values() if m.model_from is not None]
    runs = []
    for seed in grid.seeds:
        for method in ordered:
            folder = grid.output_dir / "runs" / method.name / f"seed{seed}"
            source = method.model_from or method.name
            model_folder = grid.output_dir / "runs" / source / f"seed{seed}" / "models"
            runs.append(GridRun(method, seed, folder, model_folder))
    return runs


def tracking_settings(grid: GridConfig) -> dict[str, str]:
    """MLflow store shared by every run of the grid: SQLite in the grid folder, artifacts next to it."""
    return {
        "mlflow#tracking_uri": f"sqlite:///{grid.output_dir / 'mlruns.db'}",
        "mlflow#artifact_location": (grid.output_dir / "mlruns").as_uri(),
        "mlflow#experiment_name": grid.experiment_name,
    }


def run_overrides(grid: GridConfig, run: GridRun, step: str) -> dict:
    """Return the override file content of one run's ``"train"`` or ``"evaluate"`` step."""
    overrides = {
        "output_dir": str(run.folder / "eval"),
        "ckpt_dir": str(run.model_folder),
        "seed": run.seed,
        "split_seed": grid.split_seed,
        "network_seed": grid.network_seed,
        "embedding_cache_dir": str(grid.output_dir / "cache" / "embeddings"),
        # An interrupted training continues from its newest saved state instead of starting over.
        "resume": "auto",
        **tracking_settings(grid),
        "mlflow#run_name": f"train-{run.name}",
        **grid.overrides,
        **run.method.overrides,
    }
    if step == "evaluate":
        corruptions = grid.corruptions
        overrides.update(
            {
                "evaluation_run_name": f"evaluate-{run.name}",
                "corruptions": corruptions["kinds"],
                "corruption_severities": corruptions["severities"],
                "corruption_seed": corruptions["seed"],
                "corruption_max_cases": corruptions["max_cases"],
                "corruption_dir": str(grid.output_dir / "corrupted"),
                **run.method.evaluate_overrides,
            }
        )
    return overrides


def bundle_command(step: str, configs: list[str]) -> list[str]:
    """Return the ``monai.bundle run`` command line of a training or evaluation step."""
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        {"train": "training", "evaluate": "evaluate"}[step],
        "--config_file",
        str(configs),
        "--meta_file",
        str(BUNDLE_DIR / "configs" / "metadata.json"),
        "--logging_file",
        str(BUNDLE_DIR / "configs" / "logging.conf"),
    ]


class GridRunner:
    """Run the steps of every grid run in subprocesses, ``jobs`` at a time, each with ``threads`` torch threads."""

    def __init__(self, grid: GridConfig, jobs: int = 1, threads: int | None = None) -> None:
        self.grid = grid
        self.jobs = max(1, int(jobs))
        self.threads = int(threads) if threads else max(1, (os.cpu_count() or 1) // self.jobs)
        self.trained: dict[tuple[str, int], threading.Event] = {}
        self.failed: dict[str, str] = {}
        self.outcomes: dict[str, str] = {}

    def _environment(self) -> dict[str, str]:
        environment = dict(os.environ, PYTHONPATH=str(BUNDLE_DIR))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            environment[name] = str(self.threads)
        return environment

    def _launch(self, command: list[str], log_path: Path) -> tuple[int, float, float]:
        """Run ``command`` with its output in ``log_path``; return its exit code, wall seconds and CPU seconds."""
        started = time.monotonic()
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                command, cwd=BUNDLE_DIR, env=self._environment(), stdout=log, stderr=subprocess.STDOUT
            )
            # wait4 also returns the child's resource usage. Its CPU time depends less than wall time on other
            # jobs of a shared machine.
            _, status, usage = os.wait4(process.pid, 0)
        wall_s = time.monotonic() - started
        return os.waitstatus_to_exitcode(status), wall_s, usage.ru_utime + usage.ru_stime

    def _step(self, run: GridRun, step: str) -> bool:
        marker = run.folder / ("trained.json" if step == "train" else "done.json")
        if marker.is_file():
            logger.info("%s: %s finished before, skipped.", run.name, step)
            return True

        configs = self.grid.train_configs if step == "train" else self.grid.evaluate_configs
        override = run.folder / f"{step}.yaml"
        override.write_text(yaml.safe_dump(run_overrides(self.grid, run, step), sort_keys=False))
        log_path = run.folder / f"{step}.log"
        logger.info("%s: %s started, log %s", run.name, step, log_path)
        command = bundle_command(step, [*map(str, configs), str(override)])
        exit_code, wall_s, cpu_s = self._launch(command, log_path)
        if exit_code != 0:
            self.failed[run.name] = f"{step} failed with exit code {exit_code}; see {log_path}"
            logger.error("%s: %s failed with exit code %d; see %s", run.name, step, exit_code, log_path)
            return False

        record = {
            "method": run.method.name,
            "seed": run.seed,
            "step": step,
            "wall_s": wall_s,
            "cpu_s": cpu_s,
            "threads": self.threads,
        }
        write_json_atomic(record, marker)
        logger.info("%s: %s finished in %.0f s wall, %.0f s CPU.", run.name, step, wall_s, cpu_s)
        return True

    def _run(self, run: GridRun) -> None:
        run.folder.mkdir(parents=True, exist_ok=True)
        source_key = (run.method.model_from or run.method.name, run.seed)
        if run.method.model_from is None:
            try:
                trained = self._step(run, "train")
            finally:
                # Set even when the step raises, so that runs reusing this model do not wait for it forever.
                self.trained[source_key].set()
            if not trained:
                self.outcomes[run.name] = "failed"
                return
        else:
            # The source run was queued earlier, so it has started (or finished) and this wait ends.
            self.trained[source_key].wait()
            if not (run.model_folder.parent / "trained.json").is_file():
                self.failed[run.name] = f"the training of {source_key[0]}-seed{run.seed} did not finish"
                self.outcomes[run.name] = "failed"
                return
        self.outcomes[run.name] = "done" if self._step(run, "evaluate") else "failed"

    def run(self, runs: list[GridRun]) -> dict[str, str]:
        """Run all runs and return ``{run name: "done" | "failed"}``; failures are also in ``self.failed``."""
        self.grid.output_dir.mkdir(parents=True, exist_ok=True)
        ensure_experiment(self.grid)
        for run in runs:
            self.trained.setdefault((run.method.model_from or run.method.name, run.seed), threading.Event())
        if not runs:
            return {}
        # The first run alone fills the embedding cache and writes the corrupted cases, which all later runs reuse.
        self._run(runs[0])
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for future in [pool.submit(self._run, run) for run in runs[1:]]:
                future.result()
        return self.outcomes


def ensure_experiment(grid: GridConfig) -> None:
    """Create the grid's MLflow experiment before runs start, so that parallel runs do not race to create it."""
    import mlflow

    settings = tracking_settings(grid)
    mlflow.set_tracking_uri(settings["mlflow#tracking_uri"])
    if mlflow.get_experiment_by_name(grid.experiment_name) is None:
        mlflow.create_experiment(grid.experiment_name, artifact_location=settings["mlflow#artifact_location"])


def cpu_model() -> str:
    """Return the CPU model name from ``/proc/cpuinfo``, or ``platform.processor()`` where that file is missing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def source_revision() -> dict[str, object]:
    """Return the git commit of the bundle and whether its files differ from it, or ``None`` values outside git.

    A grid runs for tens of minutes or longer, and edits to configs or scripts during that time change only the
    later runs. The report therefore records which code the runs started from.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=BUNDLE_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=BUNDLE_DIR, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": commit, "uncommitted_changes": bool(changes.strip())}


def _positive_int(text: str) -> int:
    """Parse a command-line count that must be at least 1; argparse shows the message next to the option."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _run_grid(grid: GridConfig, runs: list[GridRun], jobs: int, threads: int | None) -> dict[str, str]:
    """Run every step of the grid, write ``grid_run.json`` and return the failed runs with their reasons."""
    revision = source_revision()
    runner = GridRunner(grid, jobs=jobs, threads=threads)
    started = time.monotonic()
    runner.run(runs)
    failed = runner.failed
    write_json_atomic(
        {
            "grid": str(grid.path),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "wall_s": time.monotonic() - started,
            "jobs": runner.jobs,
            "threads_per_run": runner.threads,
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "runs": len(runs),
            **revision,
            "failed": failed,
        },
        grid.output_dir / "grid_run.json",
    )
    for name, reason in failed.items():
        logger.error("Run %s failed: %s", name, reason)
    return failed


def main(argv: list[str] | None = None) -> int:
    """Run the grid named on the command line and write its report.

    Returns 0 on success, 1 when a run failed or no run has results, and 2 for an invalid grid file or
    ``--report-only`` without a grid folder.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="grid YAML file, relative to the bundle folder or absolute")
    parser.add_argument("--jobs", type=_positive_int, default=1, help="runs at once (default 1)")
    parser.add_argument(
        "--threads", type=_positive_int, default=None, help="torch threads per run (default: CPUs / jobs)"
    )
    parser.add_argument("--report-only", action="store_true", help="skip the runs and rebuild the report")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    # Every check of the grid file runs here, before any training, and ends the program with one message.
    try:
        grid = load_grid(BUNDLE_DIR / arguments.grid, BUNDLE_DIR)
    except (GridFileError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if arguments.report_only and not grid.output_dir.is_dir():
        parser.exit(
            2,
            f"{parser.prog}: error: --report-only needs the grid folder {str(grid.output_dir)!r}, which does not "
            f"exist; run the grid without --report-only first, or check 'output_dir' in {str(grid.path)!r}.\n",
        )
    runs = plan_runs(grid)
    failed = {} if arguments.report_only else _run_grid(grid, runs, arguments.jobs, arguments.threads)

    from scripts.grid_report import write_grid_report

    try:
        write_grid_report(grid)
    except FileNotFoundError as error:
        # No run has results: every run failed, or --report-only found a grid folder without finished runs.
        logger.error("%s", error)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
