"""Several training runs on one GPU (``--runs-per-gpu K``), checked to fit before they start.

One batch-8 flow run leaves most of a large GPU idle, so K runs may share it. Before K runs are
started on one GPU, each one's memory is measured on that GPU by a probe: the run's own trainer
(its settings from params.yaml, its class's data) sets up, takes one optimiser step and scores
the test set, and reports the peak memory its caching allocator held. The K runs start only if
the sum of their peaks, plus one CUDA context per process, fits in the memory the GPU has free;
otherwise nothing starts and the error names each run's peak and the GPU's free memory.

Without a CUDA device (a CPU-only machine or job) there is no GPU memory to check: the K runs
share the CPU cores and the job's memory, and the check says so instead of measuring.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

# Memory a process's CUDA context takes outside the caching allocator (kernels, cuBLAS/cuDNN
# workspaces): not seen by torch.cuda.max_memory_reserved, so allowed for per run.
CUDA_CONTEXT_BYTES = 768 * 2**20
GiB = 2**30


class PackingError(HarnessError):
    """K runs do not fit on one GPU together."""


def exercise(trainer: Any) -> None:
    """What a run holds in memory at its peak: set-up (features included), one optimiser step,
    one scoring pass over the test set."""
    trainer._setup()
    trainer.model.train()
    features = next(iter(trainer._train_batches()))
    loss = next(iter(trainer._batch_losses(features)))
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()
    trainer.log_likelihoods("test")


def probe_memory(trainer: Any) -> dict[str, Any]:
    """Peak GPU memory of one run (``exercise``). On a CPU the probe measures nothing and says so."""
    import torch

    device = trainer.device
    if device.type != "cuda":
        return {"device": str(device)}
    free_before, total = torch.cuda.mem_get_info(device)
    torch.cuda.reset_peak_memory_stats(device)
    exercise(trainer)
    torch.cuda.synchronize(device)
    return {"device": str(device), "name": torch.cuda.get_device_name(device),
            "peak_bytes": int(torch.cuda.max_memory_reserved(device)),
            "free_bytes": int(free_before), "total_bytes": int(total)}


def probe_command(stage_cmd: str) -> list[str] | None:
    """The probe of a run stage: its ``python -m harness run ...`` command with ``--probe-memory``
    (None when the stage is not a training run of the grid)."""
    words = shlex.split(stage_cmd)
    for i in range(len(words) - 2):
        if words[i:i + 3] == ["-m", "harness", "run"]:
            return [sys.executable, *words[i:], "--probe-memory"]
    return None


def stage_commands(project: Path, stages: Sequence[str]) -> dict[str, str]:
    """Each stage's command as dvc.yaml and params.yaml expand it."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return {name: repo.stage.collect(name)[0].cmd for name in stages}


def measure(project: Path, stages: Sequence[str], env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Run the probe of every stage, one at a time, on the device ``env`` selects."""
    probes: dict[str, dict[str, Any]] = {}
    for name, cmd in stage_commands(project, stages).items():
        command = probe_command(cmd)
        if command is None:
            raise PackingError(f"stage {name} is not a training run (`python -m harness run ...`), so its "
                               "memory cannot be measured: give it --runs-per-gpu 1")
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise PackingError(f"{result.stdout}{result.stderr}\nthe memory probe of stage {name} failed "
                               f"(exit {result.returncode}): {shlex.join(command)}")
        probes[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return probes


def check_fit(probes: dict[str, dict[str, Any]]) -> str:
    """Raise PackingError when the probed runs do not fit on their GPU together; else say how
    much they need of what is free."""
    first = next(iter(probes.values()))
    k = len(probes)
    if not str(first.get("device", "cpu")).startswith("cuda"):
        return (f"no CUDA device: the {k} runs share the CPU cores and this job's memory; there is no "
                "GPU memory to check")
    need = {name: p["peak_bytes"] + CUDA_CONTEXT_BYTES for name, p in probes.items()}
    free = min(p["free_bytes"] for p in probes.values())
    summary = ", ".join(f"{name} {need[name] / GiB:.1f} GiB" for name in probes)
    if sum(need.values()) > free:
        raise PackingError(
            f"{k} runs do not fit on {first.get('name', 'the GPU')} together: they need "
            f"{sum(need.values()) / GiB:.1f} GiB ({summary}; each peak from its probe plus "
            f"{CUDA_CONTEXT_BYTES / GiB:.2f} GiB of CUDA context) and {free / GiB:.1f} GiB of "
            f"{first['total_bytes'] / GiB:.1f} GiB is free. Lower --runs-per-gpu, or give the runs a "
            "larger GPU."
        )
    return (f"{k} runs fit on {first.get('name', 'the GPU')}: {sum(need.values()) / GiB:.1f} GiB needed "
            f"({summary}) of {free / GiB:.1f} GiB free")
