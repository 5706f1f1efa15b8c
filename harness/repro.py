"""``dvc repro`` with several training runs at a time.

DVC runs the stages of one ``dvc repro`` one after another, and lets several ``dvc repro``
processes run independent stages of one project at once: while a stage's command runs, its
process holds read locks on the stage's dependencies and write locks on its outputs, and leaves
the project lock free (DVC documentation of ``dvc repro``, "Parallel stage execution"). The runs
of the grid are independent of each other, so the pipeline is reproduced in three steps:

1. the data stages (``prepare@...``) in one ``dvc repro``;
2. the training runs (``main_*``, ``ablation@...``) that ``dvc status`` reports missing or out of
   date, shared out among ``jobs`` workers, each running
   ``dvc --wait-for-lock repro --single-item <stage>``;
3. ``dvc repro`` of the whole pipeline: the stages downstream of the runs (re-scoring, tables),
   and a check that nothing else is left.

Each stage runs exactly as under a plain ``dvc repro`` (the same command, the same dvc.lock
entry), so the two are interchangeable at any point: an interrupted parallel reproduction is
finished by either.

Step 2 runs here (``executor="local"``) or as SLURM jobs (``executor="slurm"``, harness.slurm).
With ``runs_per_gpu`` K > 1, K stages share one GPU, once their memory has been checked to fit
(harness.packing).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError

DATA_STAGES = ("prepare@",)
RUN_STAGES = ("main_", "ablation@")  # one stage per training run; independent of each other
LOGS = Path("logs") / "repro"  # one log per stage run by a worker, in the project folder
EXECUTORS = ("local", "slurm")


def dvc_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Stage commands call ``python -m harness``: make ``python`` this interpreter and the project
    importable, whether or not a virtual environment is active."""
    project = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(project), env.get("PYTHONPATH", "")] if p)
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    env.setdefault("DVC_NO_ANALYTICS", "1")  # also before `dvc init` has written core.analytics=false
    env.update(extra or {})
    return env


def _dvc(args: Sequence[str], project: Path, env: dict[str, str], capture: bool = False,
         log: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dvc", *args]
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            return subprocess.run(command, cwd=project, env=env, stdout=f, stderr=subprocess.STDOUT)
    return subprocess.run(command, cwd=project, env=env, capture_output=capture, text=capture)


def _failed(what: str, project: Path, result: subprocess.CompletedProcess, log: Path | None = None) -> HarnessError:
    if log is not None:
        output, where = log.read_text(errors="replace"), f"; its log: {log}"
    else:
        output, where = (result.stdout or "") + (result.stderr or ""), ""
    tail = "".join(output.splitlines(keepends=True)[-20:])
    return HarnessError(f"{tail}\n{what} failed in {project} (exit {result.returncode}){where}. Fix it and run "
                        "again: finished stages are kept, and an interrupted run continues from its last "
                        "checkpoint.")


def stages_to_run(project: Path, prefixes: Sequence[str] = RUN_STAGES) -> list[str]:
    """The stages with these name prefixes that ``dvc status`` reports missing or out of date."""
    result = _dvc(["status", "--json"], project, dvc_environment(), capture=True)
    if result.returncode != 0:
        raise _failed("`dvc status`", project, result)
    changed = json.loads(result.stdout or "{}")
    return [name for name in changed if name.startswith(tuple(prefixes))]


@dataclass
class Worker:
    """One ``dvc repro`` at a time (or ``runs_per_gpu`` side by side on its GPU), with its share of
    the CPU threads (per run) and optionally one GPU."""

    index: int
    threads: int
    gpu: str | None = None
    runs_per_gpu: int = 1

    def environment(self) -> dict[str, str]:
        extra = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if self.gpu is not None:
            extra["CUDA_VISIBLE_DEVICES"] = self.gpu
        return dvc_environment(extra)


def make_workers(jobs: int, gpus: Sequence[str] = (), cpus: int | None = None, runs_per_gpu: int = 1) -> list[Worker]:
    """``jobs`` workers sharing the CPU cores evenly; with ``gpus``, worker i uses GPU i mod len.
    With ``runs_per_gpu`` K > 1, one worker per GPU runs K stages at a time on it (``jobs`` is then
    K per GPU, and the cores are shared among all the runs)."""
    if jobs < 1:
        raise HarnessError(f"--jobs {jobs}: give at least one job")
    if runs_per_gpu < 1:
        raise HarnessError(f"--runs-per-gpu {runs_per_gpu}: give at least one run per GPU")
    cpus = cpus or os.cpu_count() or 1
    if runs_per_gpu > 1:
        if not gpus:
            raise HarnessError(f"--runs-per-gpu {runs_per_gpu} needs --gpus (the GPUs to share): on a "
                               "machine without GPUs, use --jobs N for N runs at a time")
        if jobs not in (1, len(gpus) * runs_per_gpu):
            raise HarnessError(f"--jobs {jobs} with --runs-per-gpu {runs_per_gpu} on {len(gpus)} GPUs: the "
                               f"runs at a time are {len(gpus) * runs_per_gpu}; leave --jobs out")
        threads = max(1, cpus // (len(gpus) * runs_per_gpu))
        return [Worker(i, threads, gpu, runs_per_gpu) for i, gpu in enumerate(gpus)]
    threads = max(1, cpus // jobs)
    return [Worker(i, threads, gpus[i % len(gpus)] if gpus else None) for i in range(jobs)]


@dataclass
class StageResult:
    """How one ``dvc repro --single-item <stage>`` ended."""

    name: str
    returncode: int
    log: Path
    seconds: float


def run_stage(project: Path, name: str, env: dict[str, str]) -> StageResult:
    """Run one stage as ``dvc repro`` does; its output goes to ``logs/repro/<stage>.log``."""
    log = project / LOGS / f"{name}.log"
    start = time.perf_counter()
    # --single-item: the data stages are up to date (step 1); checking them again here would
    # lock their outputs, which the other workers' stages are reading.
    result = _dvc(["--wait-for-lock", "repro", "--single-item", name], project, env, log=log)
    return StageResult(name, result.returncode, log, time.perf_counter() - start)


def run_pack(project: Path, stages: Sequence[str], env: dict[str, str], say=print) -> list[StageResult]:
    """Run ``stages`` side by side on the device ``env`` selects (several runs on one GPU); with
    more than one, their memory is checked first (harness.packing), and none starts if they do
    not fit."""
    if len(stages) > 1:
        from harness.packing import check_fit, measure

        say(check_fit(measure(project, stages, env)) if _cuda_available(env) else
            f"no CUDA device: the {len(stages)} runs share the CPU cores and this job's memory; there is "
            "no GPU memory to check")
    results: list[StageResult] = []
    threads = [threading.Thread(target=lambda n=n: results.append(run_stage(project, n, env))) for n in stages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    order = {name: i for i, name in enumerate(stages)}
    return sorted(results, key=lambda r: order[r.name])


def _cuda_available(env: dict[str, str]) -> bool:
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    import torch

    return torch.cuda.is_available()


def run_parallel(project: Path, stages: Sequence[str], workers: Sequence[Worker], progress: bool = True) -> None:
    """Run ``stages`` (independent of each other) on the workers, each taking ``runs_per_gpu`` at a
    time; each stage's output goes to ``logs/repro/<stage>.log``. After a failure no new stage
    starts; the running ones finish."""
    todo: queue.Queue[str] = queue.Queue()
    for name in stages:
        todo.put(name)
    failures: list[StageResult] = []
    errors: list[HarnessError] = []
    lock = threading.Lock()
    done = [0]

    def work(worker: Worker) -> None:
        env = worker.environment()
        while not failures and not errors:
            pack = []
            while len(pack) < worker.runs_per_gpu:
                try:
                    pack.append(todo.get_nowait())
                except queue.Empty:
                    break
            if not pack:
                return
            try:
                results = run_pack(project, pack, env, say=lambda line: progress and print(line, flush=True))
            except HarnessError as err:  # the pack does not fit on its GPU: nothing of it started
                errors.append(err)
                return
            with lock:
                for result in results:
                    done[0] += 1
                    if result.returncode != 0:
                        failures.append(result)
                    if progress:
                        state = ("done" if result.returncode == 0 else
                                 f"FAILED (exit {result.returncode}, log {result.log})")
                        print(f"[{done[0]}/{len(stages)}] {result.name}: {state} in {result.seconds:.0f} s",
                              flush=True)

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    if failures:
        first = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        result = subprocess.CompletedProcess([], first.returncode)
        raise _failed(f"stage {first.name}{more}", project, result, first.log)


def reproduce_data(project: Path, progress: bool = True) -> None:
    """Step 1: the data stages, in one ``dvc repro`` on this machine."""
    data = _dvc(["repro", "--glob", *(f"{p}*" for p in DATA_STAGES)], project, dvc_environment(),
                capture=not progress)
    if data.returncode != 0:
        raise _failed("`dvc repro` of the data stages", project, data)


def reproduce(project: Path, jobs: int = 1, gpus: Sequence[str] = (), progress: bool = True,
              runs_per_gpu: int = 1, executor: str = "local", slurm: dict | None = None,
              warm_start: bool = True) -> None:
    """Bring every stage of the project's pipeline up to date, ``jobs`` training runs at a time
    (``runs_per_gpu`` per GPU), on this machine (``executor="local"``) or as SLURM jobs
    (``executor="slurm"``, settings ``slurm`` over params.yaml ``runtime.slurm``: harness.slurm).
    Locally, ``warm_start`` serves the stages' ``python -m harness`` commands from one interpreter
    that holds the heavy imports (harness.warmstart); a SLURM job starts its own."""
    project = Path(project)
    if executor not in EXECUTORS:
        raise HarnessError(f"--executor {executor}: use one of {', '.join(EXECUTORS)}")
    if executor == "slurm":
        from harness import slurm as cluster

        reproduce_data(project, progress)
        cluster.run_pending(project, cluster.load_settings(project, slurm or {}), runs_per_gpu=runs_per_gpu,
                            progress=progress)
        _reproduce_rest(project, dvc_environment(), progress)
        return
    server = contextlib.nullcontext()
    if warm_start and warmstart_supported():
        from harness import warmstart

        (project / LOGS).mkdir(parents=True, exist_ok=True)
        server = warmstart.server(log=project / LOGS / "warm-server.log")
    with server:
        workers = make_workers(jobs, gpus, runs_per_gpu=runs_per_gpu)
        if jobs > 1 or runs_per_gpu > 1:
            reproduce_data(project, progress)
            pending = stages_to_run(project)
            if progress:
                at_once = sum(w.runs_per_gpu for w in workers)
                print(f"{len(pending)} training runs to do, {at_once} at a time", flush=True)
            run_parallel(project, pending, workers, progress=progress)
        _reproduce_rest(project, make_workers(1, gpus)[0].environment() if gpus else dvc_environment(), progress)


def warmstart_supported() -> bool:
    """Forking a process that has loaded torch and matplotlib without exec is safe on Linux; macOS
    system libraries abort in such a child (which is why Python spawns there by default)."""
    return sys.platform.startswith("linux")


def _reproduce_rest(project: Path, env: dict[str, str], progress: bool) -> None:
    """Step 3: a plain ``dvc repro``."""
    rest = _dvc(["repro"], project, env, capture=not progress)
    if rest.returncode != 0:
        raise _failed("`dvc repro`", project, rest)
