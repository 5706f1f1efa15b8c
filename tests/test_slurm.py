"""`flowad repro --executor slurm` (harness.slurm) against a real single-node SLURM cluster started
once per test session (tests/local_slurm.py): toy DVC projects whose stages only write files, and
a tiny grid of the real pipeline (embedded data, the smallest settings). Where SLURM cannot start
here the cluster tests skip with the reason, and submitit's local executor runs the same paths.
Also the pieces without a cluster: time limits, sbatch options, state parsing, packing checks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness import demo, repro, slurm
from harness.errors import ConfigError, HarnessError
from harness.packing import CUDA_CONTEXT_BYTES, GiB, PackingError, check_fit, probe_command

sys.path.insert(0, str(Path(__file__).parent))
import local_slurm  # noqa: E402

# FLOWAD_TEST_SLURM=off runs the submitit local executor variants on a machine with SLURM.
MISSING = "FLOWAD_TEST_SLURM=off" if os.environ.get("FLOWAD_TEST_SLURM") == "off" else local_slurm.missing()
TINY_SLURM = {"time": "10", "gpus_per_run": 0, "cpus_per_run": 1, "mem_gb_per_run": 0.5, "max_jobs": 2,
              "poll_seconds": 0.5}

# A resumable toy run: STEPS steps, a checkpoint after each; slow (1 s a step) while the file
# `slow` exists in the project. Each start appends the step it started from to <out>.starts.
COUNTER = """
import json, os, sys, time
out, steps = sys.argv[1], int(sys.argv[2])
ckpt = out + ".ckpt"
step, total = json.load(open(ckpt)) if os.path.exists(ckpt) else (0, 0)
open(out + ".starts", "a").write(f"{step}\\n")
while step < steps:
    total, step = total + step * step, step + 1
    open(ckpt + ".tmp", "w").write(json.dumps([step, total]))
    os.replace(ckpt + ".tmp", ckpt)
    if os.path.exists("slow"):
        time.sleep(1)
open(out, "w").write(str(total))
"""


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if MISSING:
        pytest.skip(f"no local SLURM cluster: {MISSING}")
    running = local_slurm.LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield running
    running.stop()


@pytest.fixture(params=["slurm", "local"])
def kind(request):
    """The executor the cluster tests run on: SLURM, or submitit's local executor where SLURM is
    not installed (where it is, the local variant would repeat the same paths)."""
    if request.param == "slurm":
        request.getfixturevalue("cluster")
    elif not MISSING:
        pytest.skip("SLURM runs here: the same code paths ran against it")
    return request.param


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def toy_project(root: Path, stages: dict[str, str], kind: str = "slurm") -> Path:
    """prepare@data, one run stage per entry of ``stages`` (name -> command writing <name>.txt)
    and a tables stage reading them all; runtime.slurm set for the small test cluster."""
    spec = {"prepare": {"foreach": ["data"], "do": {
        "cmd": "python -c \"open('${item}.txt', 'w').write('x')\"", "outs": ["${item}.txt"]}}}
    for name, cmd in stages.items():
        spec[f"main_{name}"] = {"cmd": cmd, "deps": ["data.txt"], "outs": [f"{name}.txt"]}
    spec["tables"] = {"cmd": "python -c \"open('tables.txt', 'w').write('t')\"",
                      "deps": [f"{name}.txt" for name in stages], "outs": ["tables.txt"]}
    write(root / "dvc.yaml", yaml.safe_dump({"stages": spec}, sort_keys=False))
    write(root / "params.yaml", yaml.safe_dump({"runtime": {"slurm": {**TINY_SLURM, "cluster": kind}}}))
    write(root / "count.py", COUNTER)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True,
                   env=repro.dvc_environment())
    return root


def writes(name: str, text: str) -> str:
    return f"python -c \"open('{name}.txt', 'w').write('{text}')\""


def dvc(root: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                            env=repro.dvc_environment())
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def job_ids(root: Path) -> list[str]:
    return [row["job_id"] for row in json.loads((root / slurm.SLURM_LOGS / "jobs.json").read_text())]


# --------------------------------------------------------------------------- on the cluster


@pytest.mark.slow
def test_jobs_give_what_dvc_repro_gives_and_failures_are_named(kind, tmp_path, capsys):
    runs = {"a": writes("a", "1"), "b": writes("b", "2"), "c": "python -c \"raise SystemExit('broken run')\""}
    root = toy_project(tmp_path / "cluster", runs, kind)
    with pytest.raises(HarnessError) as err:
        repro.reproduce(root, executor="slurm")
    message = str(err.value)
    failed = next(j for j in json.loads((root / slurm.SLURM_LOGS / "jobs.json").read_text())
                  if j["stages"] == ["main_c"])
    assert f"SLURM job {failed['job_id']} FAILED (main_c)" in message
    assert "broken run" in message and str(root / repro.LOGS / "main_c.log") in message
    assert "1 of 3 runs failed" in message
    printed = capsys.readouterr().out
    assert "3 training runs to submit" in printed and "3 runs: 0 pending, 0 running, 2 done, 1 failed" in printed
    assert set(json.loads(dvc(root, "status", "--json"))) == {"main_c", "tables"}  # a and b are recorded

    # fixed, the command submits only what is missing, then runs the tables
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    spec["stages"]["main_c"]["cmd"] = writes("c", "3")
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    repro.reproduce(root, executor="slurm")
    assert "1 training runs to submit" in capsys.readouterr().out
    assert json.loads(dvc(root, "status", "--json")) == {}

    # the same project reproduced by a plain `dvc repro` records the same dvc.lock (the same
    # entries; their order is the order in which the stages finished)
    plain = toy_project(tmp_path / "plain", {**runs, "c": writes("c", "3")})
    dvc(plain, "repro")
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock == yaml.safe_load((plain / "dvc.lock").read_text()) and len(lock["stages"]) == 5

    # a second time nothing is submitted
    before = job_ids(root)
    repro.reproduce(root, executor="slurm")
    assert "0 training runs to submit" in capsys.readouterr().out
    assert job_ids(root) == before


@pytest.mark.slow
def test_a_job_past_its_time_limit_is_reported_and_resumes(cluster, tmp_path):
    # SLURM keeps time limits in whole minutes and checks them every 30 s: a 1-minute job ends
    # 60-90 s after it starts, so the toy run is slow (1 s a step) until it has been killed.
    steps = 200
    root = toy_project(tmp_path / "timeout", {"long": f"python count.py long.txt {steps}"})
    write(root / "slow", "")
    with pytest.raises(HarnessError) as err:
        repro.reproduce(root, executor="slurm", slurm={"time": "0:10"})  # 10 s: SLURM rounds up to 1 min
    message = str(err.value)
    job = job_ids(root)[0]
    assert f"SLURM job {job} TIMEOUT (main_long)" in message and "longer --time" in message
    assert "main_long" in json.loads(dvc(root, "status", "--json"))
    (root / "slow").unlink()
    repro.reproduce(root, executor="slurm")  # resubmitted with the default time limit
    starts = [int(s) for s in (root / "long.txt.starts").read_text().split()]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] > 0  # the second job resumed
    assert int((root / "long.txt").read_text()) == sum(i * i for i in range(steps))  # as uninterrupted
    assert json.loads(dvc(root, "status", "--json")) == {}


@pytest.mark.slow
def test_ctrl_c_cancels_only_this_commands_jobs(cluster, tmp_path):
    root = toy_project(tmp_path / "cancel", {"slow": "python -c \"import time; time.sleep(300)\""})
    other = subprocess.run(["sbatch", "--parsable", "-c1", "--mem=100M", "-o", str(tmp_path / "other.out"),
                            "--wrap", "sleep 300"], capture_output=True, text=True, check=True).stdout.strip()
    command = subprocess.Popen([sys.executable, "-m", "harness", "repro", "--executor", "slurm", "--project",
                                str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=repro.dvc_environment())
    try:
        seen = ""
        for line in command.stdout:  # wait until our job runs
            seen += line
            if "1 running" in line:
                break
        assert "1 running" in seen, seen
        command.send_signal(signal.SIGINT)
        _, err = command.communicate(timeout=60)
        ours = job_ids(root)[0]
        assert command.returncode == 2 and f"cancelled 1 jobs of this command ({ours})" in err
        for _ in range(50):
            states = slurm.slurm_states([ours, other])
            if states.get(ours) == "CANCELLED":
                break
            time.sleep(0.2)
        assert states[ours] == "CANCELLED" and states[other] == "RUNNING"
    finally:
        command.kill()
        subprocess.run(["scancel", other], check=False)


TINY = {"backbone": "resnet18.tv_in1k", "input_size": [32, 32], "input_size_overrides": {},
        "parallel_blocks": [1, 1, 1], "batch_size": 20, "meta_epochs": 1, "sub_epochs": 1,
        "warmup_meta_epochs": 0}


@pytest.mark.slow
def test_tiny_grid_on_the_cluster_two_runs_per_job(kind, tmp_path):
    out = demo.init_project(tmp_path / "grid", methods=["msflow"])
    params = yaml.safe_load((out / "params.yaml").read_text())
    params["datasets"]["embedded"]["classes"] = ["washer"]
    params["methods"]["msflow"]["all"] = dict(TINY)
    params["protocols"] = {"official": params["protocols"]["official"]}
    params["ablations"]["classes"] = ["washer"]
    params["ablations"]["train"] = {"fusion_off": params["ablations"]["train"]["fusion_off"]}
    params["ablations"]["rescore"] = {"full_mean": params["ablations"]["rescore"]["full_mean"]}
    params["runtime"]["slurm"] = {**TINY_SLURM, "cluster": kind, "mem_gb_per_run": 1.5}
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the cluster's part only (the re-scoring and the tables after it are test_pipeline's)
    repro.reproduce_data(out, progress=False)
    slurm.run_pending(out, slurm.load_settings(out, {}), runs_per_gpu=2, progress=False)
    assert set(json.loads(dvc(out, "status", "--json"))) == {"rescore", "tables"}  # the runs are recorded
    (record,) = json.loads((out / slurm.SLURM_LOGS / "jobs.json").read_text())  # one job, two runs
    assert record["state"] == "COMPLETED" and len(record["stages"]) == 2
    for run in ("runs/main/official/embedded/msflow/washer/seed-0", "runs/ablations/fusion_off/washer/seed-0"):
        assert (out / run / "metrics.json").exists()
    job_output = next((out / slurm.SLURM_LOGS).glob(f"{record['job_id']}_0_log.out")).read_text()
    assert "no CUDA device: the 2 runs share the CPU cores" in job_output


# --------------------------------------------------------------------------- without a cluster


def test_time_limits_are_whole_minutes_as_slurm_counts_them():
    assert slurm.time_minutes("90") == 90
    assert slurm.time_minutes("0:10") == 1  # 10 s rounds up
    assert slurm.time_minutes("4:00:00") == 240
    assert slurm.time_minutes("1-02:30:00") == 1590
    for bad in ("soon", "0", "1:2:3:4"):
        with pytest.raises(ConfigError, match="time limit"):
            slurm.time_minutes(bad)


def test_settings_come_from_params_and_the_command_line(tmp_path):
    write(tmp_path / "params.yaml", yaml.safe_dump({"runtime": {"slurm": {"partition": "gpu", "time": "2:00:00"}}}))
    settings = slurm.load_settings(tmp_path, {"time": "30", "account": None})
    assert (settings.partition, settings.time, settings.account) == ("gpu", "30", None)
    write(tmp_path / "params.yaml", yaml.safe_dump({"runtime": {"slurm": {"partiton": "gpu"}}}))
    with pytest.raises(ConfigError, match=r"params.yaml: runtime.slurm has unknown keys \['partiton'\]"):
        slurm.load_settings(tmp_path, {})
    assert slurm.sbatch_options(["--constraint=a100", "#SBATCH --exclusive", "--gres-flags=enforce-binding"]) == {
        "constraint": "a100", "exclusive": True, "gres_flags": "enforce-binding"}
    with pytest.raises(ConfigError, match="--name=value"):
        slurm.sbatch_options(["constraint=a100"])


def test_states_of_array_tasks_from_sacct_and_scontrol():
    sacct = "12_1|COMPLETED\n12_2|CANCELLED by 0\n12_[3-5%2]|PENDING\n13|TIMEOUT\n"
    assert slurm._parse_sacct(sacct) == {"12_1": "COMPLETED", "12_2": "CANCELLED", "12_3": "PENDING",
                                         "12_4": "PENDING", "12_5": "PENDING", "13": "TIMEOUT"}
    scontrol = ("JobId=14 ArrayJobId=12 ArrayTaskId=1 JobState=RUNNING Reason=None\n"
                "JobId=12 ArrayJobId=12 ArrayTaskId=2-3,7 JobState=PENDING Reason=JobArrayTaskLimit\n"
                "JobId=20 JobName=x JobState=OUT_OF_MEMORY\n")
    assert slurm._parse_scontrol(scontrol) == {"12_1": "RUNNING", "12_2": "PENDING", "12_3": "PENDING",
                                               "12_7": "PENDING", "20": "OUT_OF_MEMORY"}


def test_runs_share_a_gpu_only_when_their_probed_memory_fits():
    gpu = {"device": "cuda:0", "name": "H100", "free_bytes": 80 * GiB, "total_bytes": 80 * GiB}
    fits = {"a": {**gpu, "peak_bytes": 20 * GiB}, "b": {**gpu, "peak_bytes": 30 * GiB}}
    assert check_fit(fits).startswith("2 runs fit on H100")
    big = {**fits, "c": {**gpu, "peak_bytes": 30 * GiB}}
    with pytest.raises(PackingError) as err:
        check_fit(big)
    need = (80 * GiB + 3 * CUDA_CONTEXT_BYTES) / GiB
    assert f"3 runs do not fit on H100 together: they need {need:.1f} GiB" in str(err.value)
    assert "c 30.8 GiB" in str(err.value) and "Lower --runs-per-gpu" in str(err.value)
    assert "no GPU memory to check" in check_fit({"a": {"device": "cpu"}, "b": {"device": "cpu"}})
    cmd = "python -m harness run main --protocol official --dataset mtd --method msflow --class x --seed 0 --resume"
    assert probe_command(cmd)[1:] == ["-m", "harness", "run", "main", "--protocol", "official", "--dataset", "mtd",
                                      "--method", "msflow", "--class", "x", "--seed", "0", "--resume",
                                      "--probe-memory"]
    assert probe_command("python -c 'print(1)'") is None


def test_the_memory_probe_drives_a_real_run(embedded_root, tmp_path):
    from harness.config import RunSettings, RunSpec
    from harness.packing import exercise, probe_memory
    from harness.train import Trainer

    spec = RunSpec(method="msflow", data_root=embedded_root, class_name="washer", out_dir=tmp_path / "run",
                   overrides=dict(TINY))
    trainer = Trainer(spec, RunSettings(device="cpu", pretrained=False, progress=False, tracking=False))
    assert probe_memory(trainer) == {"device": "cpu"}  # nothing to measure on a CPU
    exercise(trainer)  # what the probe runs on a GPU: set-up, one step, one scoring pass
    assert not (tmp_path / "run").exists()  # a probe writes no run folder


def test_local_runs_per_gpu_workers():
    workers = repro.make_workers(1, gpus=["0", "1"], cpus=8, runs_per_gpu=2)
    assert [(w.gpu, w.runs_per_gpu, w.threads) for w in workers] == [("0", 2, 2), ("1", 2, 2)]
    with pytest.raises(HarnessError, match="needs --gpus"):
        repro.make_workers(1, runs_per_gpu=2)
    with pytest.raises(HarnessError, match="the runs at a time are 4"):
        repro.make_workers(3, gpus=["0", "1"], runs_per_gpu=2)


def test_slurm_options_need_the_slurm_executor(capsys):
    from harness.cli import main

    assert main(["repro", "--time", "10"]) == 2
    assert "are for --executor slurm" in capsys.readouterr().err
    assert re.search("--jobs and --gpus are for the local executor",
                     (main(["repro", "--executor", "slurm", "--jobs", "2"]), capsys.readouterr().err)[1])
