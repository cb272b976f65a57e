"""Progress bars for the pipeline's long steps, shown live in the terminal also when a notebook runs them.

A notebook cell's ``sys.stderr`` goes into the notebook, so a bar written there would reach the terminal
(and DVC's log) only as a stream of redraws, each also kept in the executed notebook. ``progress`` writes
to the process's own stderr (``sys.__stderr__``, file descriptor 2) instead. Under ``kvlib.runner`` that
is the runner's stderr, inherited by the kernel and its subprocesses (``accelerate launch``), because the
runner starts the kernel with ``capture_fd_output`` off (by default IPython kernels redirect descriptor 2
into the notebook): the bar is live in the runner's terminal and stays out of the executed notebook. Off
a terminal (a log file, CI) it redraws at most every ``LOG_INTERVAL`` seconds, so a log holds a few lines
per step, not one per update.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between redraws when stderr is not a terminal


def progress(iterable=None, desc: str = "", total: int | None = None, disable: bool = False, **kwargs) -> tqdm:
    """A tqdm bar on the process's own stderr (see the module docstring); ``kwargs`` go to tqdm, except that
    off a terminal the redraw interval is ``LOG_INTERVAL``."""
    stream = sys.__stderr__
    if stream is not None and not stream.isatty():  # tqdm's monitor thread redraws after maxinterval: hold both
        kwargs |= {"mininterval": LOG_INTERVAL, "maxinterval": LOG_INTERVAL}
    return tqdm(iterable, desc=desc, total=total, disable=disable or stream is None, file=stream, **kwargs)
