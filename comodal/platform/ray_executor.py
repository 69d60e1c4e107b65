"""``comodal compare --executor ray``: each planned run as a Ray task with its CPUs and GPUs,
on a local Ray instance or a cluster, training with ``compare._train`` into the same run
directories as the local executor. Ray is an optional extra, imported only here and only when
chosen; this module imports nothing heavy, so that the small gate actor starts fast.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING, Any

from comodal.errors import ConfigError

if TYPE_CHECKING:
    from comodal.platform.compare import Planned


def import_ray() -> Any:
    """The ``ray`` module, or a ``ConfigError`` saying how to install the optional extra."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError("--executor ray: Ray is not installed; install comodal's ray extra "
                          "with pip install -e '.[ray]' (in a checkout) or "
                          "pip install 'comodal[ray]'") from err
    return ray


class _Gate:
    """Open until a run fails; runs that start after that train nothing (a Ray actor)."""

    def __init__(self) -> None:
        self.is_open = True

    def close(self) -> None:
        self.is_open = False

    def opened(self) -> bool:
        return self.is_open


def _ray_train(r: Planned, threads: int, cwd: str, gate: Any) -> bool:
    """One Ray task: ``_train`` in the working directory of ``compare`` (relative paths such
    as ``data.cache_dir`` mean the same on every node), unless a run has failed meanwhile."""
    import ray

    from comodal.platform.compare import _train

    try:
        os.chdir(cwd)
    except OSError as err:
        raise ConfigError(f"--executor ray: the working directory of compare, {cwd}, is not on "
                          f"node {socket.gethostname()} ({err.strerror}); run compare from a "
                          "directory every Ray node sees at the same path") from None
    if not ray.get(gate.opened.remote()):
        return False
    _train(r, threads)
    return True


def check_address(address: str) -> None:
    """A ``HOST:PORT`` (or ``ray://HOST:PORT``) that nothing listens on: a clear error now,
    where ``ray.init`` would retry for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        if address == "auto":
            return
        raise ConfigError(f"--address {address}: not HOST:PORT (e.g. 10.0.0.5:6379, the "
                          "address ray start --head prints)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as err:
        raise ConfigError(f"--address {address}: no Ray cluster answers there "
                          f"({err.strerror or err}); start one with ray start --head, or "
                          "leave out --address for a local instance") from None


def _check_fits(ray: Any, cpus: int, gpus: float, started: bool) -> None:
    """A run that asks for more than any node has would wait forever: refuse it on a local
    instance, warn on a cluster (an autoscaler may still add such a node)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        return
    have = ", ".join(f"{n.get('CPU', 0):g} CPUs and {n.get('GPU', 0):g} GPUs" for n in nodes)
    text = (f"--cpus-per-run {cpus} --gpus-per-run {gpus:g}: no Ray node has that much "
            f"(the nodes have {have or 'nothing'})")
    if started:
        raise ConfigError(f"{text}; ask for less, or pass --address of a cluster that has it")
    print(f"comodal: warning: {text}; the runs wait until the cluster has such a node",
          file=sys.stderr)


def execute_ray(todo: list[Planned], bar: Any, address: str | None = None,
                cpus_per_run: int = 1, gpus_per_run: float = 0.0) -> None:
    """Each run as a Ray task with ``cpus_per_run`` CPUs (its torch threads) and
    ``gpus_per_run`` GPUs, on the Ray instance this process is connected to, else on the
    cluster at ``address`` (or ``RAY_ADDRESS``), else on a new local instance, which is shut
    down at the end (from a cluster this process only disconnects). The run directories must
    be on a filesystem every node sees at the same path. A failed run stops the runs not yet
    started, the running ones finish, and its error is raised as the run raised it; Ctrl-C
    ends the running ones (their finished tasks' checkpoints are kept)."""
    from comodal.platform.compare import _for_workers

    ray = import_ray()
    started = not ray.is_initialized()
    target = None
    if started:
        target = address or os.environ.get("RAY_ADDRESS") or "local"
        if target != "local":
            check_address(target)
        local = {"include_dashboard": False} if target == "local" else {}
        try:
            ray.init(address=target, **local)
        except (ConnectionError, ValueError, ray.exceptions.AuthenticationError) as err:
            token = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
                "; a cluster with token authentication (ray start's default) also needs "
                "RAY_AUTH_MODE=token here and its token (ray get-auth-token on the head) in "
                "RAY_AUTH_TOKEN or ~/.ray/auth_token")
            raise ConfigError(f"--address {target}: cannot connect to the Ray cluster there "
                              f"({err}){token}") from err
    try:
        _check_fits(ray, cpus_per_run, gpus_per_run, started and target == "local")
        _for_workers(todo)
        gate = ray.remote(num_cpus=0)(_Gate).remote()
        task = ray.remote(_ray_train)
        refs = {task.options(num_cpus=cpus_per_run, num_gpus=gpus_per_run,
                             name=f"{r.stack} seed{r.seed}")
                .remote(r, cpus_per_run, os.getcwd(), gate): r for r in todo}
        waiting, failure = list(refs), None
        try:
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                try:
                    if ray.get(done[0]):
                        bar.update()
                except Exception as err:  # the first failure is raised below
                    if failure is None:
                        failure = err
                        ray.get(gate.close.remote())  # the running runs finish
        except KeyboardInterrupt:
            for ref in waiting:
                ray.cancel(ref, force=True)
            raise
        if failure is not None:
            cause = getattr(failure, "cause", None)
            if isinstance(failure, ray.exceptions.RayTaskError) and \
                    isinstance(cause, BaseException):
                raise cause from failure  # as the run raised it, like the local executor
            raise failure
    finally:
        if started:
            ray.shutdown()
