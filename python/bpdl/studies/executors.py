"""Where jobs run: in the study process, in a local process pool, or on a Ray cluster.

All three share one small interface: ``slots`` (how many jobs may run at once), ``submit(job)``
and ``wait(timeout)`` returning the ``(job, outcome)`` pairs that finished. Outcomes come from
:func:`bpdl.studies.worker.run_job`, which turns a failing trial into a ``failed`` outcome, so
an executor only has to report infrastructure failures (a worker process that died) itself.

Threads: each pool or Ray worker runs its trials with its own torch thread count (default:
the CPUs this process may use divided by the number of workers), set once when the worker
starts and again by the trial's run config.
"""

from __future__ import annotations

import collections
import os
import signal
from abc import ABC, abstractmethod
from typing import Any

from bpdl.errors import ConfigError
from bpdl.studies.worker import DataSpec, Job, load_study_data, run_job

EXECUTORS = ("inprocess", "process", "ray")
#: a job whose worker process dies this many times is recorded as failed
MAX_WORKER_DEATHS = 2


def available_cpus() -> int:
    """CPUs this process may run on (affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(workers: int) -> int:
    return max(1, available_cpus() // max(1, workers))


class Executor(ABC):
    """Runs :class:`Job` objects; see the module docstring."""

    name = "executor"
    slots = 1

    def start(self) -> None:  # noqa: B027  (optional hook: most executors need no set-up)
        """Acquire resources (processes, a Ray connection); called once before submitting."""

    @abstractmethod
    def submit(self, job: Job) -> None: ...

    @abstractmethod
    def wait(self, timeout: float | None) -> list[tuple[Job, dict[str, Any]]]:
        """Finished jobs (at least one unless ``timeout`` passes first or nothing is pending)."""

    @abstractmethod
    def pending(self) -> int:
        """Jobs submitted and not yet returned by :meth:`wait`."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release resources; jobs still running are abandoned."""

    def describe(self) -> str:
        return self.name

    def __enter__(self) -> Executor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessExecutor(Executor):
    """Runs one job at a time in the study process (simplest; best for debugging)."""

    name = "inprocess"

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self.slots = 1
        self._queue: collections.deque[Job] = collections.deque()

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def wait(self, timeout: float | None) -> list[tuple[Job, dict[str, Any]]]:
        if not self._queue:
            return []
        job = self._queue.popleft()
        return [(job, run_job(job))]

    def pending(self) -> int:
        return len(self._queue)

    def describe(self) -> str:
        return f"in-process ({self.threads or 'default'} threads)"


def _init_pool_worker(threads: int, preload: DataSpec | None = None) -> None:
    """Process-pool initialiser: thread counts, die with the study process (Linux), and load
    the study's data once, so that no trial's time includes it."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:  # a pool worker orphaned by a killed study would otherwise finish its trial for nobody
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already fixed in this process
    if preload is not None:
        try:
            load_study_data(preload)
        except Exception:  # the first job reports the same error as its outcome
            pass


class ProcessPoolExecutor(Executor):
    """A local pool of ``workers`` processes (spawned, so torch state is never forked)."""

    name = "process"

    def __init__(self, workers: int, threads: int | None = None,
                 preload: DataSpec | None = None):
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        self.slots = workers
        self.threads = threads or default_threads(workers)
        self.preload = preload
        self._pool = None
        self._futures: dict[Any, Job] = {}
        self._deaths: collections.Counter = collections.Counter()

    def start(self) -> None:
        import concurrent.futures
        import multiprocessing

        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.slots, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_pool_worker, initargs=(self.threads, self.preload))

    def submit(self, job: Job) -> None:
        from concurrent.futures.process import BrokenProcessPool

        try:
            future = self._pool.submit(run_job, job)
        except BrokenProcessPool:
            self._restart()
            future = self._pool.submit(run_job, job)
        self._futures[future] = job

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.start()

    def wait(self, timeout: float | None) -> list[tuple[Job, dict[str, Any]]]:
        import concurrent.futures
        from concurrent.futures.process import BrokenProcessPool

        if not self._futures:
            return []
        done, _ = concurrent.futures.wait(list(self._futures), timeout=timeout,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        out, broken = [], []
        for future in done:
            job = self._futures.pop(future)
            try:
                out.append((job, future.result()))
            except BrokenProcessPool:
                broken.append(job)
            except Exception as err:  # pickling problems and the like: a bpdl bug, but recorded
                out.append((job, {"status": "failed", "error": f"{type(err).__name__}: {err}"}))
        if broken:
            # A worker died (killed, out of memory). Every job in the pool is lost with it and
            # which one killed it is unknown: run them again, and fail a job that keeps dying.
            for future, job in list(self._futures.items()):
                broken.append(job)
                del self._futures[future]
            self._restart()
            for job in broken:
                self._deaths[(job.kind, job.key)] += 1
                if self._deaths[(job.kind, job.key)] >= MAX_WORKER_DEATHS:
                    out.append((job, {"status": "failed", "error": (
                        f"the worker process died {MAX_WORKER_DEATHS} times while running "
                        f"this job (killed or out of memory)")}))
                else:
                    self.submit(job)
        return out

    def pending(self) -> int:
        return len(self._futures)

    def close(self) -> None:
        if self._pool is not None:
            processes = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for proc in processes:
                if proc.is_alive():  # abandoned trials: do not let them run on
                    proc.kill()
            self._pool = None

    def describe(self) -> str:
        return f"process pool ({self.slots} workers x {self.threads} threads)"


class RayExecutor(Executor):
    """Jobs as Ray tasks: a local Ray instance, or an existing cluster via ``address``.

    Each task reserves ``threads`` CPUs and ``gpus`` GPUs (fractions share a GPU). ``workers``
    caps the jobs in flight (default: the cluster's CPUs divided by ``threads``). Cluster nodes
    need bpdl installed and the datasets in their data root (or network to download them).
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None,
                 threads: int | None = None, gpus: float = 0.0, local_cpus: int | None = None):
        if gpus < 0:
            raise ConfigError(f"--gpus-per-trial must be >= 0, got {gpus}")
        self.address = address
        self.threads = threads or 1
        self.gpus = gpus
        self.workers = workers
        self.local_cpus = local_cpus
        self.slots = workers or 1
        self._ray = None
        self._remote = None
        self._refs: dict[Any, Job] = {}
        self._started_ray = False

    def start(self) -> None:
        try:
            import ray
        except ImportError as err:
            raise ConfigError("the Ray executor needs Ray: pip install 'bpdl[ray]' (or "
                              "pip install 'ray[default]')") from err
        self._ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if self.address:
                kwargs["address"] = self.address
            else:
                kwargs["num_cpus"] = self.local_cpus or available_cpus()
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ConfigError(f"cannot start or reach Ray"
                                  f"{' at ' + self.address if self.address else ''}: {err}"
                                  ) from err
            self._started_ray = True
        resources = ray.cluster_resources()
        cpus = int(resources.get("CPU", 1))
        if self.gpus > 0 and resources.get("GPU", 0) < self.gpus:
            raise ConfigError(f"--gpus-per-trial {self.gpus} but the Ray cluster has "
                              f"{resources.get('GPU', 0)} GPU(s)")
        if self.threads > cpus:
            raise ConfigError(f"--threads {self.threads} per trial but the Ray cluster has only "
                              f"{cpus} CPU(s)")
        if self.workers is None:
            by_cpu = max(1, cpus // self.threads)
            by_gpu = int(resources.get("GPU", 0) // self.gpus) if self.gpus > 0 else by_cpu
            self.slots = max(1, min(by_cpu, by_gpu))
        self._remote = ray.remote(num_cpus=self.threads, num_gpus=self.gpus,
                                  max_retries=1)(run_job)

    def submit(self, job: Job) -> None:
        self._refs[self._remote.remote(job)] = job

    def wait(self, timeout: float | None) -> list[tuple[Job, dict[str, Any]]]:
        if not self._refs:
            return []
        ready, _ = self._ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            job = self._refs.pop(ref)
            try:
                out.append((job, self._ray.get(ref)))
            except self._ray.exceptions.RayError as err:  # worker or node died
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                out.append((job, {"status": "failed",
                                  "error": f"Ray task failed: {type(err).__name__}: {first}"}))
        return out

    def pending(self) -> int:
        return len(self._refs)

    def close(self) -> None:
        if self._ray is not None:
            for ref in list(self._refs):
                try:
                    self._ray.cancel(ref, force=True)
                except Exception:  # already finished or gone
                    pass
            self._refs.clear()
            if self._started_ray:
                self._ray.shutdown()
            self._ray = None

    def describe(self) -> str:
        where = self.address or "local"
        gpu = f", {self.gpus} GPU" if self.gpus else ""
        return f"Ray ({where}; {self.slots} concurrent trials x {self.threads} CPU{gpu})"


def check_executor_options(kind: str, *, workers: int | None = None,
                           threads: int | None = None, address: str | None = None,
                           gpus_per_trial: float = 0.0) -> None:
    """ConfigError for executor options that cannot work; cheap, so a study calls it before it
    loads any data."""
    if kind not in EXECUTORS:
        raise ConfigError(f"unknown executor {kind!r}; valid executors are: {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if kind != "ray" and (address or gpus_per_trial):
        raise ConfigError("--address and --gpus-per-trial apply to --executor ray only")
    if kind == "inprocess" and workers not in (None, 1):
        raise ConfigError("the in-process executor runs one trial at a time; use "
                          "--executor process (or ray) with --workers")


def make_executor(kind: str, *, workers: int | None = None, threads: int | None = None,
                  address: str | None = None, gpus_per_trial: float = 0.0,
                  preload: DataSpec | None = None) -> Executor:
    """An executor by name: ``inprocess``, ``process`` or ``ray``. ``preload``: data a process
    pool's workers load when they start."""
    check_executor_options(kind, workers=workers, threads=threads, address=address,
                           gpus_per_trial=gpus_per_trial)
    if kind == "inprocess":
        return InProcessExecutor(threads)
    if kind == "process":
        return ProcessPoolExecutor(workers or 1, threads, preload)
    return RayExecutor(address, workers, threads, gpus_per_trial)
