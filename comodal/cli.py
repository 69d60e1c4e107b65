"""``comodal`` command line: ``run`` a config, ``compare`` strategies over seeds, ``report`` a
comparison again from its saved results, ``summarize`` run directories side by side, ``list``
what a config can name."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

from comodal.config import EXECUTORS, REPORT_COLUMNS, load_config
from comodal.errors import ComodalError, ConfigError

COLUMNS_HELP = ("summary table columns: default (the headline metric's Acc, Avg inc Acc, BWT, "
                "FWT, Forgetting, Plasticity, then R@10 and zero-shot Acc, or WER and CER of "
                "sequence tasks) or cmcl (the CMCL "
                "paper's: zero-shot Acc and its BWT, R@1, R@5, R@10, BWT of R@10)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comodal", description=__doc__)
    parser.add_argument("--version", action="version", version=f"comodal {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train through a scenario and write a run directory")
    run.add_argument("config", help="YAML run config (see examples/)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a config field, e.g. train.epochs=5")
    run.add_argument("--out", help="run directory (default: the config's 'out' or runs/<name>)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the run directory's last checkpoint")
    comp = sub.add_parser("compare", help="run several strategies over several seeds, then "
                                          "write tables and plots")
    comp.add_argument("config", help="YAML run config (its scenario, model and training)")
    comp.add_argument("--strategies", required=True,
                      help="comma-separated entries; '+' stacks strategies, e.g. "
                           "finetune,er,er+relation_kd")
    comp.add_argument("--seeds", type=int, default=3, help="seeds per entry (default 3), "
                                                            "from the config's seed on")
    comp.add_argument("--workers", type=int, default=None, metavar="K",
                      help="local executor: runs at once (default 1)")
    comp.add_argument("--executor", choices=EXECUTORS, default="local",
                      help="local: runs in this machine's processes (default); ray: each run "
                           "a Ray task, on a local Ray instance or the cluster at --address "
                           "(needs pip install -e '.[ray]'; --out must then be on a "
                           "filesystem every Ray node sees at the same path)")
    comp.add_argument("--address", default=None,
                      help="ray executor: address of a running Ray cluster, e.g. "
                           "HEAD_IP:6379 from ray start --head (default: RAY_ADDRESS, else a "
                           "new local instance)")
    comp.add_argument("--cpus-per-run", type=int, default=None, metavar="N",
                      help="ray executor: CPUs (and torch threads) of each run (default 1)")
    comp.add_argument("--gpus-per-run", type=float, default=None, metavar="G",
                      help="ray executor: GPUs of each run, fractions share one (default 0)")
    comp.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override a config field, e.g. train.epochs=5")
    comp.add_argument("--out", help="comparison directory (default runs/<config name>-compare)")
    comp.add_argument("--columns", choices=REPORT_COLUMNS, default="default",
                      help=COLUMNS_HELP)
    comp.add_argument("--rerun", action="store_true",
                      help="retrain from scratch the finished runs made with another config "
                           "(without it, such runs stop the comparison)")
    data = sub.add_parser("data", help="make a dataset")
    made = data.add_subparsers(dest="dataset", required=True)
    fsc = made.add_parser("synth-fsc", help="synthesise a spoken-commands corpus in Fluent "
                                           "Speech Commands' layout (eSpeak NG, offline)")
    fsc.add_argument("--out", required=True, help="directory to write the corpus into")
    fsc.add_argument("--seed", type=int, default=0)
    fsc.add_argument("--train-speakers", type=int, default=20)
    fsc.add_argument("--valid-speakers", type=int, default=4)
    fsc.add_argument("--test-speakers", type=int, default=4)
    fsc.add_argument("--no-noise", action="store_true", help="clean speech, no additive noise")
    rep = sub.add_parser("report", help="re-render a comparison's tables and plots")
    rep.add_argument("dir", help="comparison directory written by 'comodal compare'")
    rep.add_argument("--columns", choices=REPORT_COLUMNS, default=None,
                     help=COLUMNS_HELP + "; default: the ones compare was given")
    summ = sub.add_parser("summarize", help="print the summaries of run directories side by side")
    summ.add_argument("runs", nargs="+", help="run directories written by 'comodal run'")
    summ.add_argument("--metric", default=None, help="metric to show (default: all headline)")
    names = sub.add_parser("list", help="the registered strategies (options, task kinds), "
                                        "datasets and encoders")
    names.add_argument("--json", action="store_true", help="print them as JSON")
    return parser


def version() -> str:
    """The installed distribution's version, or the package's own when it is not installed."""
    try:
        return importlib.metadata.version("comodal")
    except importlib.metadata.PackageNotFoundError:
        import comodal

        return comodal.__version__


def registered() -> dict[str, Any]:
    """What a config can name: each strategy's task kinds and options (with their defaults),
    each dataset's modalities and each modality's encoders."""
    from comodal.platform.modalities import ENCODERS, OTHER_ENCODERS
    from comodal.scenarios import cmcl
    from comodal.scenarios.registry import dataset_names, dataset_spec
    from comodal.strategies.registry import strategies

    def default(f: dataclasses.Field) -> Any:
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return "(required)"

    return {
        "strategies": {name: {"kinds": list(cls.kinds),
                              "options": {f.name: default(f)
                                          for f in dataclasses.fields(cls.Config)}}
                       for name, cls in strategies().items()},
        "datasets": {name: list(dataset_spec(name).modalities) for name in dataset_names()},
        "encoders": {modality: list(names) for modality, names in ENCODERS.items()},
        # any other modality name (depth, thermal, touch, ...) takes precomputed features
        "other_modality_encoders": list(OTHER_ENCODERS),
        # cmcl/<name> under data.cmcl.root: each CMCL dataset's feature rows, in order
        "cmcl_datasets": {name: list(rows) for name, rows in cmcl.ROWS.items()},
    }


def _cmd_list(args: argparse.Namespace) -> int:
    import yaml

    found = registered()
    if args.json:
        print(json.dumps(found, indent=1))
        return 0

    def as_yaml(value: Any) -> str:  # as a --set or a config takes it
        return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()

    print("strategies (task kinds; options under strategy_args.<name> with their defaults):")
    for name, info in found["strategies"].items():
        print(f"  {name} ({', '.join(info['kinds'])})")
        options = " ".join(f"{k}={as_yaml(v)}" for k, v in info["options"].items())
        print(textwrap.fill(options or "no options", 100, initial_indent=" " * 6,
                            subsequent_indent=" " * 6, break_long_words=False))
    print("datasets (modalities):")
    width = max(map(len, [*found["datasets"], "features/<name>"]))
    for name, modalities in found["datasets"].items():
        print(f"  {name:<{width}}  {', '.join(modalities)}")
    print(f"  {'features/<name>':<{width}}  each entry of data.features, with its modalities")
    print(f"  {'cmcl/<name>':<{width}}  CMCL feature files under data.cmcl.root; rows:")
    for name, rows in found["cmcl_datasets"].items():
        print(f"    {name:<{width - 2}}  {', '.join(f'{i} {m}' for i, m in enumerate(rows))}")
    print("encoders (model.modalities.<modality>.encoder):")
    for modality, names in found["encoders"].items():
        print(f"  {modality:<6}  {', '.join(names)}")
    print(f"  {'other':<6}  {', '.join(found['other_modality_encoders'])} (any other modality "
          "name: depth, thermal, touch, ...)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.out:
        config.out = args.out
    if config.out is None:
        config.out = str(Path("runs") / Path(args.config).stem / "-".join(config.strategies))
    from comodal.platform import distributed
    from comodal.platform.metrics import POOLED
    from comodal.platform.results import format_matrix, format_summaries
    from comodal.platform.run import HEADLINE, run

    try:
        result = run(config, resume=args.resume)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the checkpoints of the finished tasks are kept in "
                                f"{config.out}/checkpoints; add --resume to the same command "
                                "to continue") from None
    world = distributed.current()
    if world is not None and not world.main:
        return 0  # rank 0 reports
    print(f"\nrun directory: {result.out}  ({result.seconds:.1f} s)")
    for metric in HEADLINE:
        if metric in result.matrices:
            print()
            print(format_matrix(result.matrices[metric], result.task_names, metric))
    label = "+".join(config.strategies)
    for metric in HEADLINE:
        if metric in result.summary:
            print()
            print(format_summaries({label: result.summary}, metric, metric in POOLED))
    return 0


def _cmd_summarize(args: argparse.Namespace) -> int:
    from comodal.platform.results import (
        check_same_format,
        format_matrix,
        format_summaries,
        read_run,
    )
    from comodal.platform.run import HEADLINE

    paths = [Path(p).resolve() for p in args.runs]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    runs = {str(p.relative_to(common)) or p.name: read_run(p) for p in paths}
    check_same_format(runs)
    available = set.intersection(*(set(r["summary"]) for r in runs.values()))
    if args.metric and args.metric not in available:
        raise ConfigError(f"--metric: {args.metric!r} is not in every run "
                          f"(available: {', '.join(sorted(available))})")
    metrics = [args.metric] if args.metric else [m for m in HEADLINE if m in available]
    nan = float("nan")
    for name, data in runs.items():
        matrix = torch.tensor([[nan if v is None else v for v in row]
                               for row in data["matrices"][metrics[0]]])
        print(f"\n[{name}]")
        print(format_matrix(matrix, data["tasks"], metrics[0]))
    for metric in metrics:
        print()
        pooled = all(metric in r.get("pooled_acc", ()) for r in runs.values())
        print(format_summaries({n: r["summary"] for n, r in runs.items()}, metric, pooled))
    return 0


def _check_executor(args: argparse.Namespace) -> None:
    """Each option of ``compare`` belongs to one executor; fill in the defaults, refuse the
    rest, and for Ray check that it is installed, all before anything is planned."""
    ray_only = {"--address": args.address, "--cpus-per-run": args.cpus_per_run,
                "--gpus-per-run": args.gpus_per_run}
    if args.executor == "local":
        given = [name for name, value in ray_only.items() if value is not None]
        if given:
            raise ConfigError(f"{given[0]}: only with --executor ray (the local executor runs "
                              "--workers runs at once on this machine's CPUs)")
        args.cpus_per_run, args.gpus_per_run = 1, 0.0  # unused
        args.workers = 1 if args.workers is None else args.workers
        if args.workers < 1:
            raise ConfigError(f"--workers: must be at least 1, got {args.workers}")
        return
    if args.workers is not None:
        raise ConfigError("--workers: only with --executor local; with ray, the cluster's "
                          "resources and --cpus-per-run/--gpus-per-run decide how many runs "
                          "train at once")
    args.workers = 1
    args.cpus_per_run = 1 if args.cpus_per_run is None else args.cpus_per_run
    args.gpus_per_run = 0.0 if args.gpus_per_run is None else args.gpus_per_run
    if args.cpus_per_run < 1:
        raise ConfigError(f"--cpus-per-run: must be at least 1, got {args.cpus_per_run}")
    if not args.gpus_per_run >= 0 or args.gpus_per_run == float("inf"):
        raise ConfigError(f"--gpus-per-run: must be 0 or more, got {args.gpus_per_run:g}")
    if args.address is not None and not args.address.strip():
        raise ConfigError("--address: empty; give HOST:PORT of a Ray cluster's head, or leave "
                          "it out for a local instance")
    from comodal.platform.ray_executor import check_address, import_ray

    import_ray()
    if args.address is not None:
        check_address(args.address)


def _cmd_compare(args: argparse.Namespace) -> int:
    _check_executor(args)
    from comodal.core.files import atomic_write_text
    from comodal.platform.compare import execute, parse_stacks, pending, plan

    config = load_config(args.config, args.overrides, check=False)  # each run is checked
    out = Path(args.out or Path("runs") / f"{Path(args.config).stem}-compare")
    stacks = parse_stacks(args.strategies)
    runs = plan(config, stacks, args.seeds, out)
    todo = pending(runs, args.rerun)
    atomic_write_text(out / "compare.json", json.dumps(
        {"config": str(args.config), "overrides": args.overrides, "strategies": stacks,
         "seeds": [r.seed for r in runs[: args.seeds]], "columns": args.columns}, indent=1))
    try:
        execute(todo, args.workers, progress=config.progress, executor=args.executor,
                address=args.address, cpus_per_run=args.cpus_per_run,
                gpus_per_run=args.gpus_per_run)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"finished runs and the checkpoints of finished tasks are kept "
                                f"in {out}; the same compare command continues") from None
    print(f"{len(todo)} runs trained, {len(runs) - len(todo)} already finished")
    return _report(out, args.columns)


def _cmd_data(args: argparse.Namespace) -> int:
    from comodal.config import SynthFSCConfig
    from comodal.scenarios.synth_fsc import generate

    counts = (args.train_speakers, args.valid_speakers, args.test_speakers)
    if min(counts) < 1:
        raise ConfigError(f"--train/valid/test-speakers: each must be at least 1, got {counts}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; give a directory to write the corpus into")
    if (out / "data").exists():
        raise ConfigError(f"--out: {out} already holds a corpus (data/); choose a new directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out: cannot create {out} ({err.strerror}); choose a directory "
                          "you can write to") from err
    if not os.access(out, os.W_OK):
        raise ConfigError(f"--out: {out} is not writable; choose a directory you can write to")
    spec = SynthFSCConfig(args.seed, *counts, noise=not args.no_noise)
    generate(out, spec)
    lines = {s: sum(1 for _ in (out / "data" / f"{s}_data.csv").open()) - 1
             for s in ("train", "valid", "test")}
    print(f"wrote {out}: " + ", ".join(f"{n} {s} utterances" for s, n in lines.items()))
    return 0


def _report(directory: Path, columns: str | None) -> int:
    from comodal.platform.report import write_report

    written = write_report(directory, columns)
    print(f"\n{written['markdown']}")
    if written["missing"]:
        print(f"comodal: warning: {len(written['missing'])} planned runs have not finished and "
              f"are left out of the table: {', '.join(written['missing'][:10])}"
              + (", ..." if len(written["missing"]) > 10 else ""), file=sys.stderr)
    print(f"tables: {directory / 'summary.md'}, {directory / 'summary.csv'}")
    print("plots: " + ", ".join(str(p) for p in written["plots"].values()))
    print(f"TensorBoard: the figures are in {directory / 'tb'}, each run's scalars in "
          f"{directory}/<entry>/seed<k>/tb; to see both: tensorboard --logdir {directory}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "compare":
            return _cmd_compare(args)
        if args.command == "report":
            return _report(Path(args.dir), args.columns)
        if args.command == "data":
            return _cmd_data(args)
        if args.command == "list":
            return _cmd_list(args)
        return _cmd_summarize(args)
    except (ComodalError, FileNotFoundError) as err:
        print(f"comodal: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # raised with what is kept and how to continue
        print("comodal: interrupted" + (f"; {err}" if str(err) else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (`comodal list | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
