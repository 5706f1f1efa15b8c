"""``flowad repro --executor slurm``: the training runs of the grid as SLURM jobs, through submitit.

The pipeline is reproduced as ``flowad repro --jobs N`` does (harness.repro), with step 2 on the
cluster:

1. the data stages run here, on the submitting machine (compute nodes often have no internet);
2. every run stage that ``dvc status`` reports missing or out of date becomes one SLURM job
   (``runs_per_gpu`` stages per job, sharing its GPU), all submitted as one job array with at most
   ``max_jobs`` running at once. A job runs ``dvc --wait-for-lock repro --single-item <stage>`` in
   the shared checkout, exactly as a plain ``dvc repro`` runs the stage, so ``dvc.lock`` stays the
   one record of what is done: a finished stage stays recorded whatever happens to the others,
   and running the command again submits only what is still missing;
3. ``dvc repro`` here for the re-scoring and the tables.

While the jobs run, the command prints how many runs are pending, running, done and failed. A
failed job is reported with its stages, job id, state (FAILED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL,
CANCELLED, ...), the tail of each stage's log and the paths of the logs. A job killed by its time
limit or preempted leaves its run folder with the last checkpoint; the stage command has
``--resume``, so the resubmitted job continues from it, to the same result. Ctrl-C cancels the
jobs this command submitted, and only those.

Job states come from ``sacct`` where the cluster keeps accounting, else from ``squeue`` /
``scontrol`` (which know a job until ``MinJobAge`` after it ends). ``cluster="local"`` runs the
same jobs with submitit's local executor (one process per job, no time limit enforcement other
than submitit's own, no SLURM states): the tests use it where SLURM is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError, HarnessError
from harness.repro import LOGS, dvc_environment, run_pack, stages_to_run

SLURM_LOGS = Path("logs") / "slurm"  # submitit's job scripts, pickles and job logs; jobs.json
DONE = {"COMPLETED"}
FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "PREEMPTED", "BOOT_FAIL",
          "DEADLINE", "REVOKED", "SPECIAL_EXIT", "UNKNOWN"}
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING", "SUSPENDED"}
TAIL_LINES = 20


@dataclass
class SlurmSettings:
    """What clusters differ in; defaults in params.yaml ``runtime.slurm``, each overridable on the
    command line. Resources are per run: a job packing K runs asks for K times the CPUs and memory
    and shares its GPUs among them."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "4:00:00"  # time limit per job: minutes, MM:SS, HH:MM:SS or D-HH:MM:SS
    gpus_per_run: int = 1  # GPUs per job; 0 for CPU jobs
    cpus_per_run: int = 8
    mem_gb_per_run: float = 32.0
    max_jobs: int = 100  # jobs running at once (the job array's parallelism)
    sbatch: list[str] = field(default_factory=list)  # extra sbatch options, e.g. "--constraint=a100"
    setup: list[str] = field(default_factory=list)  # shell lines run before each job (module load, ...)
    poll_seconds: float = 15.0  # how often the states are asked for
    cluster: str = "slurm"  # "local": submitit's local executor, for machines without SLURM

    def __post_init__(self) -> None:
        if self.cluster not in ("slurm", "local"):
            raise ConfigError(f"runtime.slurm.cluster={self.cluster!r}: use slurm (or local, for tests)")
        for name in ("cpus_per_run", "max_jobs"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"runtime.slurm.{name}={getattr(self, name)} must be at least 1")
        if self.gpus_per_run < 0 or self.mem_gb_per_run <= 0 or self.poll_seconds <= 0:
            raise ConfigError("runtime.slurm: gpus_per_run must be >= 0, mem_gb_per_run and poll_seconds > 0")
        time_minutes(self.time)  # a bad time limit is an error before anything is submitted


def load_settings(project: Path, overrides: dict[str, Any]) -> SlurmSettings:
    """params.yaml ``runtime.slurm`` of the project, with ``overrides`` (the command line) on top."""
    path = Path(project) / "params.yaml"
    params = yaml.safe_load(path.read_text()) if path.exists() else {}
    stored = dict(((params or {}).get("runtime") or {}).get("slurm") or {})
    known = {f.name for f in dataclasses.fields(SlurmSettings)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ConfigError(f"{path}: runtime.slurm has unknown keys {unknown}; known: {sorted(known)}")
    stored.update({k: v for k, v in overrides.items() if v is not None})
    return SlurmSettings(**stored)


def time_minutes(value: str | int) -> int:
    """A SLURM time limit in whole minutes, as SLURM itself counts them (seconds round up)."""
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise ConfigError(f"time limit {value!r}: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    if seconds <= 0:
        raise ConfigError(f"time limit {value!r} is zero: give the jobs some time")
    return -(-seconds // 60)


def sbatch_options(lines: Sequence[str]) -> dict[str, Any]:
    """``["--constraint=a100", "--exclusive"]`` -> submitit's additional parameters."""
    options: dict[str, Any] = {}
    for line in lines:
        text = line.strip().removeprefix("#SBATCH").strip()
        if not text.startswith("--"):
            raise ConfigError(f"sbatch option {line!r}: write it as --name=value (or --flag)")
        name, sep, value = text[2:].partition("=")
        options[name.replace("-", "_")] = value if sep else True
    return options


# --------------------------------------------------------------------------- inside a job


class StageFailed(HarnessError):
    """One or more stages of a job exited with an error."""


def run_job(project: str, stages: list[str], threads: int) -> dict[str, Any]:
    """The body of one job: its stages, side by side on the job's GPU (harness.repro.run_pack).
    Raises StageFailed (the job ends FAILED) when a stage fails."""
    # submitit turns its pre-timeout signal into a "not checkpointable" error that ends the job
    # early; here the time limit is SLURM's alone, and the run continues from its checkpoint when
    # resubmitted. Ignored signals stay ignored in the child processes.
    for name in ("SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    started = time.time()
    env = dvc_environment({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    results = run_pack(Path(project), stages, env, say=lambda line: print(line, flush=True))
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise StageFailed("; ".join(f"stage {r.name} exited {r.returncode} (log {r.log})" for r in failed))
    return {"host": socket.gethostname(), "started": started, "finished": time.time(),
            "stages": {r.name: round(r.seconds, 2) for r in results}}


# --------------------------------------------------------------------------- submission


@dataclass
class Job:
    """One submitted job and what is known about it."""

    job: Any  # submitit.Job
    stages: list[str]
    submitted: float
    state: str = "PENDING"

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)


def make_executor(project: Path, settings: SlurmSettings, runs_per_job: int):
    import submitit

    executor = submitit.AutoExecutor(folder=project / SLURM_LOGS, cluster=settings.cluster)
    params: dict[str, Any] = {
        "name": f"flowad-{project.resolve().name}",
        "timeout_min": time_minutes(settings.time),
        "cpus_per_task": settings.cpus_per_run * runs_per_job,
        "mem_gb": settings.mem_gb_per_run * runs_per_job,
        "slurm_array_parallelism": settings.max_jobs,
    }
    if settings.gpus_per_run:
        params["gpus_per_node"] = settings.gpus_per_run
    for key in ("partition", "account", "qos"):
        if getattr(settings, key):
            params[f"slurm_{key}"] = getattr(settings, key)
    if settings.sbatch:
        params["slurm_additional_parameters"] = sbatch_options(settings.sbatch)
    if settings.setup:
        params["slurm_setup"] = list(settings.setup)
    executor.update_parameters(**params)
    return executor


def submit(project: Path, stages: Sequence[str], settings: SlurmSettings, runs_per_job: int = 1) -> list[Job]:
    """One job per ``runs_per_job`` stages, submitted as one job array."""
    packs = [list(stages[i:i + runs_per_job]) for i in range(0, len(stages), runs_per_job)]
    if not packs:
        return []
    executor = make_executor(project, settings, runs_per_job)
    submitted = time.time()
    jobs = executor.map_array(run_job, [str(project.resolve())] * len(packs), packs,
                              [settings.cpus_per_run] * len(packs))
    return [Job(job, pack, submitted) for job, pack in zip(jobs, packs)]


# --------------------------------------------------------------------------- states


def _expand(array_id: str, tasks: str) -> list[str]:
    """``"3-9%2"`` or ``"[1,4-5]"`` of array ``array_id`` -> ``["<id>_3", ...]``."""
    ids: list[str] = []
    for part in tasks.strip("[]").split("%")[0].split(","):
        first, _, rest = part.partition("-")
        last, _, step = rest.partition(":")
        if first.isdigit():
            ids += [f"{array_id}_{i}" for i in range(int(first), int(last or first) + 1, int(step or 1))]
    return ids


def _parse_sacct(text: str) -> dict[str, str]:
    states: dict[str, str] = {}
    for line in text.splitlines():
        job_id, _, state = line.partition("|")
        state = state.split()[0] if state.strip() else "UNKNOWN"
        array_id, sep, tasks = job_id.partition("_")
        for one in (_expand(array_id, tasks) if sep and not tasks.isdigit() else [job_id]):
            states[one] = state
    return states


def _parse_scontrol(text: str) -> dict[str, str]:
    states: dict[str, str] = {}
    for line in text.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        state = fields.get("JobState", "UNKNOWN")
        array_id, tasks = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
        if array_id and tasks:
            for one in (_expand(array_id, tasks) if not tasks.isdigit() else [f"{array_id}_{tasks}"]):
                states[one] = state
        elif "JobId" in fields:
            states[fields["JobId"]] = state
    return states


def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """The SLURM state of each job (``<array>_<task>`` or plain ids) that SLURM still knows."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if not arrays:
        return {}
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(arrays)],
                           capture_output=True, text=True)
    if sacct.returncode == 0 and sacct.stdout.strip():
        return _parse_sacct(sacct.stdout)
    # No accounting on this cluster (or not yet): the controller's own view.
    states: dict[str, str] = {}
    for array in arrays:
        shown = subprocess.run(["scontrol", "show", "job", "-o", array], capture_output=True, text=True)
        if shown.returncode == 0:
            states.update(_parse_scontrol(shown.stdout))
    return states


def _local_state(job: Any, timeout_s: float, submitted: float) -> str:
    """submitit's local executor knows RUNNING / FINISHED / INTERRUPTED; the result file says
    how a finished job ended."""
    state = job.state
    if state == "RUNNING":
        return "RUNNING"
    if state == "INTERRUPTED":
        return "CANCELLED"
    if not job.paths.result_pickle.exists():
        return "TIMEOUT" if time.time() - submitted >= timeout_s else "FAILED"
    outcome, _ = _result(job)
    return "COMPLETED" if outcome == "success" else "FAILED"


def _result(job: Any) -> tuple[str, Any]:
    import pickle

    try:
        with job.paths.result_pickle.open("rb") as f:
            return pickle.load(f)  # submitit's own file, written by the job it submitted
    except (OSError, EOFError, pickle.UnpicklingError):
        return "missing", None


def update_states(jobs: Sequence[Job], settings: SlurmSettings) -> None:
    active = [j for j in jobs if j.state not in DONE | FAILED]
    if not active:
        return
    if settings.cluster == "local":
        for j in active:
            j.state = _local_state(j.job, time_minutes(settings.time) * 60, j.submitted)
        return
    known = slurm_states([j.job_id for j in active])
    for j in active:
        if j.job_id in known:
            j.state = known[j.job_id]
        else:  # SLURM has forgotten it (MinJobAge): the job's result file tells how it ended
            outcome, _ = _result(j.job)
            if outcome in ("success", "error"):
                j.state = "COMPLETED" if outcome == "success" else "FAILED"
            elif j.state in RUNNING:
                j.state = "UNKNOWN"


def counts(jobs: Sequence[Job]) -> Counter:
    """Runs (stages, not jobs) by where they stand: pending, running, done, failed."""
    tally: Counter = Counter()
    for j in jobs:
        where = ("done" if j.state in DONE else "failed" if j.state in FAILED else
                 "running" if j.state in RUNNING else "pending")
        tally[where] += len(j.stages)
    return tally


def cancel(jobs: Sequence[Job], settings: SlurmSettings) -> list[str]:
    """Cancel the jobs of this command that have not ended (only those, by their ids)."""
    active = [j for j in jobs if j.state not in DONE | FAILED]
    if not active:
        return []
    if settings.cluster == "local":
        for j in active:
            j.job.cancel(check=False)
    else:
        subprocess.run(["scancel", *[j.job_id for j in active]], capture_output=True, text=True)
    for j in active:
        j.state = "CANCELLED"
    return [j.job_id for j in active]


def wait(jobs: Sequence[Job], settings: SlurmSettings, progress: bool = True) -> None:
    """Poll until every job has ended, printing the runs' counts whenever they change."""
    last = None
    total = sum(len(j.stages) for j in jobs)
    while True:
        update_states(jobs, settings)
        tally = counts(jobs)
        line = (f"{total} runs: {tally['pending']} pending, {tally['running']} running, {tally['done']} done, "
                f"{tally['failed']} failed")
        if progress and line != last:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last = line
        if tally["done"] + tally["failed"] == total:
            return
        time.sleep(settings.poll_seconds)


# --------------------------------------------------------------------------- reporting


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    if not path.exists():
        return ""
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def failure_report(project: Path, job: Job, settings: SlurmSettings) -> str:
    """What went wrong in one job: state, stages, log tails and log paths."""
    advice = {
        "TIMEOUT": f"it ran into its time limit ({settings.time}); run again with a longer --time: the run "
                   "continues from its last checkpoint",
        "OUT_OF_MEMORY": f"it used more than its memory ({settings.mem_gb_per_run:g} GB per run); raise "
                         "--mem-per-run",
        "PREEMPTED": "it was preempted; run again: the run continues from its last checkpoint",
        "NODE_FAIL": "its node failed; run again: the run continues from its last checkpoint",
        "CANCELLED": "it was cancelled; run again to resubmit it",
    }.get(job.state, "see its log")
    parts = [f"SLURM job {job.job_id} {job.state} ({', '.join(job.stages)}): {advice}."]
    job_log = Path(job.job.paths.stderr)
    for name in job.stages:
        log = project / LOGS / f"{name}.log"
        if log.exists():
            parts.append(f"--- stage {name}, last lines of {log}:\n{_tail(log).rstrip()}")
        else:
            parts.append(f"--- stage {name}: it did not start (no {log})")
    parts.append(f"--- whole logs: {project / LOGS}/<stage>.log; the job's own output: {job_log} and "
                 f"{Path(job.job.paths.stdout)}")
    if not any((project / LOGS / f"{n}.log").exists() for n in job.stages):
        parts.append(f"--- last lines of {job_log}:\n{_tail(job_log).rstrip()}")
    return "\n".join(parts)


def write_record(project: Path, jobs: Sequence[Job]) -> Path:
    """``logs/slurm/jobs.json``: each job's id, stages, state, and when it was submitted, started
    and finished (the last two from the job itself)."""
    rows = []
    for j in jobs:
        outcome, value = _result(j.job)
        row = {"job_id": j.job_id, "stages": j.stages, "state": j.state, "submitted": j.submitted}
        if outcome == "success" and isinstance(value, dict):
            row.update({k: value[k] for k in ("host", "started", "finished", "stages") if k in value})
            row["stage_seconds"] = row.pop("stages")
            row["stages"] = j.stages
        rows.append(row)
    path = project / SLURM_LOGS / "jobs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- the command


def run_pending(project: Path, settings: SlurmSettings, runs_per_gpu: int = 1, progress: bool = True) -> list[Job]:
    """Step 2 on the cluster: submit the out-of-date run stages, wait, report. Returns the jobs."""
    if runs_per_gpu < 1:
        raise HarnessError(f"--runs-per-gpu {runs_per_gpu}: give at least one run per GPU")
    project = Path(project)
    pending = stages_to_run(project)
    if progress:
        per_job = f", {runs_per_gpu} per job" if runs_per_gpu > 1 else ""
        print(f"{len(pending)} training runs to submit{per_job} ({settings.cluster})", flush=True)
    jobs = submit(project, pending, settings, runs_per_gpu)
    if not jobs:
        return jobs
    if progress:
        ids = sorted({j.job_id.split("_")[0] for j in jobs})
        print(f"submitted {len(jobs)} jobs ({'array ' if settings.cluster == 'slurm' else ''}{', '.join(ids)}); "
              f"logs in {project / SLURM_LOGS}", flush=True)
    try:
        wait(jobs, settings, progress)
    except KeyboardInterrupt:
        cancelled = cancel(jobs, settings)
        write_record(project, jobs)
        raise HarnessError(f"interrupted: cancelled {len(cancelled)} jobs of this command "
                           f"({', '.join(cancelled) or 'none left'}); the finished stages are recorded in "
                           "dvc.lock, and running the command again submits the rest") from None
    write_record(project, jobs)
    failed = [j for j in jobs if j.state not in DONE]
    if failed:
        runs = sum(len(j.stages) for j in failed)
        report = "\n\n".join(failure_report(project, j, settings) for j in failed)
        raise HarnessError(f"{report}\n\n{runs} of {sum(len(j.stages) for j in jobs)} runs failed on the cluster. "
                           "The finished ones are recorded in dvc.lock; fix the cause and run the command "
                           "again: it submits only what is still missing.")
    return jobs

