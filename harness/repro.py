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
"""

from __future__ import annotations

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
    """One ``dvc repro`` at a time, with its share of the CPU threads and (optionally) one GPU."""

    index: int
    threads: int
    gpu: str | None = None

    def environment(self) -> dict[str, str]:
        extra = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if self.gpu is not None:
            extra["CUDA_VISIBLE_DEVICES"] = self.gpu
        return dvc_environment(extra)


def make_workers(jobs: int, gpus: Sequence[str] = (), cpus: int | None = None) -> list[Worker]:
    """``jobs`` workers sharing the CPU cores evenly; with ``gpus``, worker i uses GPU i mod len."""
    if jobs < 1:
        raise HarnessError(f"--jobs {jobs}: give at least one job")
    cpus = cpus or os.cpu_count() or 1
    threads = max(1, cpus // jobs)
    return [Worker(i, threads, gpus[i % len(gpus)] if gpus else None) for i in range(jobs)]


def run_parallel(project: Path, stages: Sequence[str], workers: Sequence[Worker], progress: bool = True) -> None:
    """Run ``stages`` (independent of each other) on the workers; each stage's output goes to
    ``logs/repro/<stage>.log``. After a failure no new stage starts; the running ones finish."""
    todo: queue.Queue[str] = queue.Queue()
    for name in stages:
        todo.put(name)
    failures: list[tuple[str, subprocess.CompletedProcess, Path]] = []
    lock = threading.Lock()
    done = [0]

    def work(worker: Worker) -> None:
        env = worker.environment()
        while not failures:
            try:
                name = todo.get_nowait()
            except queue.Empty:
                return
            log = project / LOGS / f"{name}.log"
            start = time.perf_counter()
            # --single-item: the data stages are up to date (step 1); checking them again here would
            # lock their outputs, which the other workers' stages are reading.
            result = _dvc(["--wait-for-lock", "repro", "--single-item", name], project, env, log=log)
            with lock:
                done[0] += 1
                if result.returncode != 0:
                    failures.append((name, result, log))
                if progress:
                    state = "done" if result.returncode == 0 else f"FAILED (exit {result.returncode}, log {log})"
                    print(f"[{done[0]}/{len(stages)}] {name}: {state} in {time.perf_counter() - start:.0f} s",
                          flush=True)

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        name, result, log = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise _failed(f"stage {name}{more}", project, result, log)


def reproduce(project: Path, jobs: int = 1, gpus: Sequence[str] = (), progress: bool = True) -> None:
    """Bring every stage of the project's pipeline up to date, ``jobs`` training runs at a time."""
    project = Path(project)
    if jobs > 1:
        data = _dvc(["repro", "--glob", *(f"{p}*" for p in DATA_STAGES)], project, dvc_environment(),
                    capture=not progress)
        if data.returncode != 0:
            raise _failed("`dvc repro` of the data stages", project, data)
        pending = stages_to_run(project)
        if progress:
            print(f"{len(pending)} training runs to do, {jobs} at a time", flush=True)
        run_parallel(project, pending, make_workers(jobs, gpus), progress=progress)
    env = make_workers(1, gpus)[0].environment() if gpus else dvc_environment()
    rest = _dvc(["repro"], project, env, capture=not progress)
    if rest.returncode != 0:
        raise _failed("`dvc repro`", project, rest)
