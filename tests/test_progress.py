import io
import sys

import pytest
import tqdm.std

from kvlib.progress import LOG_INTERVAL, progress


class Stream(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.fixture
def clock(monkeypatch):
    """tqdm's clock, advanced by hand; no monitor thread redrawing on its own."""
    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0)
    return now


def redraws(terminal: bool, seconds: int, monkeypatch, clock) -> int:
    """How often a bar over ``seconds`` one-second steps draws itself on a (non-)terminal stderr."""
    stream = Stream(terminal)
    monkeypatch.setattr(sys, "__stderr__", stream)
    for _ in progress(range(seconds), desc="steps"):
        clock[0] += 1.0
    return stream.getvalue().count("\r")


def test_the_bar_goes_to_the_process_stderr_not_to_a_replaced_sys_stderr(monkeypatch):
    process, cell = Stream(terminal=False), Stream(terminal=False)  # a kernel points sys.stderr into the notebook
    monkeypatch.setattr(sys, "__stderr__", process)
    monkeypatch.setattr(sys, "stderr", cell)
    for _ in progress(range(3), desc="extract"):
        pass
    assert "extract: 100%" in process.getvalue() and "3/3" in process.getvalue()
    assert cell.getvalue() == ""


def test_off_a_terminal_the_bar_redraws_at_most_every_log_interval(monkeypatch, clock):
    seconds = 4 * int(LOG_INTERVAL)
    assert redraws(False, seconds, monkeypatch, clock) <= seconds / LOG_INTERVAL + 2  # plus the first and last
    assert redraws(True, seconds, monkeypatch, clock) >= seconds  # live on a terminal: every step


def test_a_disabled_bar_writes_nothing(monkeypatch):
    stream = Stream(terminal=True)
    monkeypatch.setattr(sys, "__stderr__", stream)
    assert list(progress(range(3), desc="train", disable=True)) == [0, 1, 2]
    assert stream.getvalue() == ""


def test_without_a_stderr_the_bar_is_off(monkeypatch):
    monkeypatch.setattr(sys, "__stderr__", None)  # pythonw, some daemons
    assert list(progress(range(2))) == [0, 1]
