"""Independent jobs side by side, each in a spawned process of its own (the seeds of a study's group or arm).

On two CPU cores, two processes of one torch thread each can make more steps per second than one process of two
threads (measured: 1.0-1.4x for the main study's student, 1.6x for the latent student's KaVa steps), and a job's
result does not depend on which jobs run beside it. Processes are spawned, not forked: a fresh interpreter
inherits no threads of a Jupyter kernel.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor


def check_workers(workers) -> None:
    """Refuse a count of processes side by side that is not an integer >= 1."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers={workers!r} must be an integer >= 1 (processes side by side)")


def side_by_side(fn: Callable, jobs: dict, workers: int) -> dict:
    """``fn(**jobs[key])`` for every key, ``workers`` at a time in spawned processes (one worker or one job: one
    after another in this process); key -> result. A failed job raises once every started job has ended."""
    check_workers(workers)
    workers = min(workers, len(jobs))
    if workers <= 1:
        return {key: fn(**kwargs) for key, kwargs in jobs.items()}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {key: pool.submit(fn, **kwargs) for key, kwargs in jobs.items()}
        return {key: f.result() for key, f in futures.items()}
