"""``comodal compare``: every strategy x seed of one config, in one comparison directory.

Layout: ``<dir>/<stack>/seed<k>/`` is an ordinary run directory (a stack is strategies joined
by ``+``, e.g. ``er+relation_kd``, each optionally with its own options: ``dns(preset=paper)``).
A finished run (``metrics.json``) is reused only when its resolved config equals the requested
one, and retrained from scratch on request; a run with checkpoints resumes from its last
finished task (it starts over when a configured plugin has no ``state_dict``, since its state
is not in the checkpoints). With several workers, runs go to a pool of processes, each with its
share of the CPU threads, that exit when the parent dies. With the ``ray`` executor each run is
a Ray task with its CPUs and GPUs, on a local Ray instance or a cluster; it trains with the
same ``_train`` into the same directories.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import ctypes
import dataclasses
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from comodal.build import check, stateless_plugins
from comodal.config import EXECUTORS, RunConfig, from_dict
from comodal.errors import ConfigError
from comodal.platform import checkpoint
from comodal.platform.results import RESULTS_FORMAT, read_run, results_format
from comodal.yaml_input import config_diff, read_yaml

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclasses.dataclass(frozen=True)
class Planned:
    stack: str
    seed: int
    config: RunConfig
    fresh: bool = False  # train from scratch, replacing a finished run of another config

    @property
    def out(self) -> Path:
        return Path(self.config.out)


ENTRY = re.compile(r"([A-Za-z0-9_-]+)(?:\((.*)\))?")


def split_outside_parentheses(text: str, sep: str) -> list[str] | None:
    """``text`` split at each ``sep`` outside parentheses (stripped); None when they do not
    balance."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text + sep):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return None
        if char == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts if depth == 0 else None


def parse_stacks(text: str) -> list[str]:
    """``a,b+c,d(k=v)`` -> ``["a", "b+c", "d(k=v)"]``: comma-separated entries (commas inside
    parentheses belong to the entry), ``+`` stacks strategies."""
    stacks = [s for s in split_outside_parentheses(text, ",") or [] if s]
    if not stacks or split_outside_parentheses(text, ",") is None:
        raise ConfigError(f"--strategies: name at least one strategy, e.g. finetune,er,dns, "
                          f"with balanced parentheses, got {text!r}")
    if len(set(stacks)) != len(stacks):
        raise ConfigError(f"--strategies: an entry appears twice in {text!r}")
    return stacks


def parse_entry(entry: str) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """``dns(preset=paper,mode=update)+ewc`` -> the strategy names and the entry's own options
    of each (values read as YAML), which override the config's ``strategy_args``."""
    names, options = [], {}
    for part in split_outside_parentheses(entry, "+") or [entry]:
        match = ENTRY.fullmatch(part)
        if match is None:
            raise ConfigError(f"--strategies {entry!r}: {part!r} is not a strategy name "
                              "optionally followed by its options, e.g. dns(preset=paper)")
        name, given = match.groups()
        names.append(name)
        for pair in split_outside_parentheses(given or "", ",") or []:
            if not pair.strip():
                continue
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--strategies {entry!r}: {pair!r} is not option=value, "
                                  "e.g. dns(preset=paper)")
            options.setdefault(name, {})[key.strip()] = yaml.safe_load(value)
    return names, options


def plan(config: RunConfig, stacks: list[str], seeds: int, out: Path) -> list[Planned]:
    """One validated run config per stack and seed (seeds ``config.seed`` onwards); the
    config's ``strategy_args`` go to the stacks that contain each strategy, updated by an
    entry's own options (``dns(preset=paper)``), its ``plugins`` (and ``imports``) to every
    stack."""
    if seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {seeds}")
    entries = {stack: parse_entry(stack) for stack in stacks}
    named = {n for names, _ in entries.values() for n in names}
    for name in config.strategy_args:
        if name not in named:
            raise ConfigError(f"strategy_args.{name}: {name!r} is in no --strategies entry "
                              f"({', '.join(stacks)})")
    runs = []
    for stack, (names, options) in entries.items():
        args = {n: {**config.strategy_args.get(n, {}), **options.get(n, {})} for n in names
                if n in config.strategy_args or n in options}
        for k in range(seeds):
            seed = config.seed + k
            run_config = dataclasses.replace(
                config, strategies=names, seed=seed, out=str(out / stack / f"seed{seed}"),
                strategy_args=copy.deepcopy(args))
            try:
                check(run_config)
            except ConfigError as err:
                raise ConfigError(f"--strategies {stack!r}: {err}") from err
            runs.append(Planned(stack, run_config.seed, run_config))
    return runs


def _mismatch(r: Planned) -> str | None:
    """How the results, or else the checkpoints, in ``r.out`` differ from what ``r`` asks for
    (a few dotted keys with old -> new values), or None when they can be reused or resumed."""
    from comodal.platform.run import identity

    want = identity(r.config)
    if (r.out / "metrics.json").is_file():
        made = results_format(read_run(r.out))
        if made != RESULTS_FORMAT:
            return (f"results_format: {made} -> {RESULTS_FORMAT}, an older comodal that "
                    "computed its numbers differently")
        try:
            saved = identity(from_dict(RunConfig, read_yaml(r.out / "config.yaml",
                                                            "run config")))
        except ConfigError as err:
            return str(err)
    else:
        found = checkpoint.saved(r.out / "checkpoints")
        if not found:
            return None
        saved = checkpoint.read(found[-1][1])["config"]
    return None if saved == want else "; ".join(config_diff(saved, want, limit=3))


def pending(runs: list[Planned], rerun: bool = False) -> list[Planned]:
    """The runs to train: unfinished ones, and with ``rerun`` those whose results or
    checkpoints come from another config or results format, marked ``fresh`` (their old
    ``metrics.json`` is removed here, before ``compare.json`` names the new settings). Without
    ``rerun`` such a run is a ``ConfigError`` naming its directory and the differing keys,
    raised before anything trains: its results would be reported under settings that never
    produced them."""
    todo, stale = [], []
    for r in runs:
        why = _mismatch(r)
        if why is not None:
            stale.append((r, why))
            todo.append(dataclasses.replace(r, fresh=True))
        elif not (r.out / "metrics.json").is_file():
            todo.append(r)
    if stale and not rerun:
        r, why = stale[0]
        more = f" (and {len(stale) - 1} other runs)" if len(stale) > 1 else ""
        raise ConfigError(f"{r.out}: made with another config ({why}){more}; add --rerun "
                          "to retrain such runs from scratch, or choose another --out")
    for r, _ in stale:
        (r.out / "metrics.json").unlink(missing_ok=True)
    return todo


def _train(r: Planned, threads: int = 0) -> None:
    """One run: resumed from its checkpoints, or from scratch when ``r.fresh`` or when a
    plugin's state cannot be restored from a checkpoint (it has no ``state_dict``)."""
    from comodal.platform.run import run

    if threads:
        torch.set_num_threads(threads)
    run(r.config, resume=not r.fresh and not stateless_plugins(r.config))


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _worker_init(parent: int) -> None:
    """Pool worker start-up: exit when the parent dies (after a kill -9 of ``compare`` the
    workers would run on forever) and leave Ctrl-C to the parent, which ends the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":  # the kernel sends SIGTERM when the parent dies
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    else:  # portable fallback: a daemon thread polls the parent's pid
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _for_workers(todo: list[Planned]) -> None:
    """Before runs go to other processes: no progress bars (one per run would interleave),
    and the corpora generated and the features cached once, not in every worker."""
    from comodal.platform.run import build_trainer
    from comodal.scenarios.registry import build_scenario

    for r in todo:
        r.config.progress = False
    build_trainer(todo[0].config).prepare(build_scenario(todo[0].config))


def execute(todo: list[Planned], workers: int = 1, progress: bool = True, *,
            executor: str = "local", address: str | None = None, cpus_per_run: int = 1,
            gpus_per_run: float = 0.0) -> None:
    """Train the runs ``pending`` returned: ``workers`` at once with the ``local`` executor,
    or as Ray tasks of ``cpus_per_run`` CPUs (and threads) and ``gpus_per_run`` GPUs each
    with the ``ray`` executor (``comodal.platform.ray_executor``). A run that fails stops
    the runs not yet started, lets the running ones finish, and raises its error."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor: {executor!r} is not one of {', '.join(EXECUTORS)}")
    bar = tqdm(total=len(todo), desc="compare", disable=not progress)
    if executor == "ray":
        from comodal.platform.ray_executor import execute_ray

        if todo:
            execute_ray(todo, bar, address, cpus_per_run, gpus_per_run)
    elif workers <= 1:
        for r in todo:
            bar.set_postfix_str(f"{r.stack} seed {r.seed}")
            _train(r)
            bar.update()
    elif todo:
        threads = max(1, (os.cpu_count() or 1) // workers)
        _for_workers(todo)
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_worker_init, initargs=(os.getpid(),))
        try:
            futures = [pool.submit(_train, r, threads) for r in todo]
            for future in cf.as_completed(futures):
                future.result()
                bar.update()
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in multiprocessing.active_children():  # the pool's; they ignore Ctrl-C
                worker.terminate()
            raise
        except BaseException:
            pool.shutdown(cancel_futures=True)  # running runs finish and keep their results
            raise
        pool.shutdown()
    bar.close()
