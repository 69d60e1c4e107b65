"""``comodal compare``: every strategy x seed of one config, in one comparison directory.

Layout: ``<dir>/<stack>/seed<k>/`` is an ordinary run directory (a stack is strategies joined
by ``+``, e.g. ``er+relation_kd``). A run whose ``metrics.json`` exists is skipped; a run
with checkpoints resumes from its last finished task. With several workers, runs go to a pool
of processes, each with its share of the CPU threads.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from comodal.config import RunConfig, validate
from comodal.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Planned:
    stack: str
    seed: int
    config: RunConfig

    @property
    def out(self) -> Path:
        return Path(self.config.out)


def parse_stacks(text: str) -> list[str]:
    """``a,b+c`` -> ``["a", "b+c"]``: comma-separated entries, ``+`` stacks strategies."""
    stacks = [s.strip() for s in text.split(",") if s.strip()]
    if not stacks:
        raise ConfigError("--strategies: name at least one strategy, e.g. finetune,er,dns")
    if len(set(stacks)) != len(stacks):
        raise ConfigError(f"--strategies: an entry appears twice in {text!r}")
    return stacks


def plan(config: RunConfig, stacks: list[str], seeds: int, out: Path) -> list[Planned]:
    """One validated run config per stack and seed (seeds ``config.seed`` onwards); the
    config's ``strategy_args`` go to the stacks that contain each strategy."""
    if seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {seeds}")
    named = {n for stack in stacks for n in stack.split("+")}
    for name in config.strategy_args:
        if name not in named:
            raise ConfigError(f"strategy_args.{name}: {name!r} is in no --strategies entry "
                              f"({', '.join(stacks)})")
    runs = []
    for stack in stacks:
        names = stack.split("+")
        for k in range(seeds):
            seed = config.seed + k
            run_config = dataclasses.replace(
                config, strategies=names, seed=seed, out=str(out / stack / f"seed{seed}"),
                strategy_args={n: a for n, a in config.strategy_args.items() if n in names})
            try:
                validate(run_config)
            except ConfigError as err:
                raise ConfigError(f"--strategies {stack!r}: {err}") from err
            runs.append(Planned(stack, run_config.seed, run_config))
    return runs


def _run_one(config: RunConfig, threads: int) -> str:
    """One run in a worker process (resuming from its checkpoints)."""
    from comodal.platform.run import run

    torch.set_num_threads(threads)
    run(config, resume=True)
    return config.out


def execute(runs: list[Planned], workers: int = 1, progress: bool = True) -> dict[str, int]:
    """Train every run not finished yet; returns how many were trained and skipped."""
    from comodal.platform.run import run

    todo = [r for r in runs if not (r.out / "metrics.json").is_file()]
    bar = tqdm(total=len(todo), desc="compare", disable=not progress)
    if workers <= 1:
        for r in todo:
            bar.set_postfix_str(f"{r.stack} seed {r.seed}")
            run(r.config, resume=True)
            bar.update()
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        for r in todo:
            r.config.progress = False  # one bar per run would interleave across processes
        if todo:  # generate corpora and cache features once, not in every worker
            from comodal.platform.run import build_trainer
            from comodal.scenarios.registry import build_scenario

            build_trainer(todo[0].config).prepare(build_scenario(todo[0].config))
        context = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_run_one, r.config, threads) for r in todo]
            try:
                for future in cf.as_completed(futures):
                    future.result()
                    bar.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    bar.close()
    return {"trained": len(todo), "skipped": len(runs) - len(todo)}
