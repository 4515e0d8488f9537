"""Progress display for a run: a rich bar on a terminal, one plain line per event elsewhere."""

from __future__ import annotations

import contextlib
import sys
import time

from harness.figures import TEST_ACCURACY, TEST_LOSS, objective
from harness.stats import judged_by_loss

# How a progress line names the figure a task is judged by.
SPOKEN = {TEST_LOSS.name: "held-out loss", TEST_ACCURACY.name: "test accuracy"}


def _outcome(record: dict) -> str:
    metrics = record.get("metrics") or {}
    judged = objective(by_loss=judged_by_loss([record]))
    if record["status"] == "ok" and metrics.get(judged.name) is None:
        judged = TEST_ACCURACY
    if record["status"] == "ok" and metrics.get(judged.name) is not None:
        return f"ok  {SPOKEN[judged.name]} {metrics[judged.name]:.4f}  {metrics.get('wall_s', 0):.1f} s"
    return f"{record['status'].upper()}: {record.get('error')}"


def _epoch_result(event: dict, digits: int = 4) -> str:
    """The epoch's figure that decides the task: held-out loss for a loss-judged task, else test accuracy."""
    judged = objective(by_loss=event.get("objective") == "loss")
    if event.get(judged.name) is None:
        judged = TEST_ACCURACY
    return f"{SPOKEN[judged.name]} {event[judged.name]:.{digits}f}"


class _PlainBar:
    """For logs and CI: a line when a cell starts, per epoch, and when it ends."""

    def __init__(self, total: int, stream):
        self.total, self.stream, self.done, self.t0 = total, stream, 0, time.monotonic()

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def start_cell(self, label: str) -> None:
        self._line(f"[{self.done + 1}/{self.total}] {label} ...")

    def event(self, event: dict) -> None:
        if event.get("event") == "epoch":
            self._line(f"    {event['stage']} epoch {event['epoch']}/{event['epochs']}: "
                       f"loss {event['train_loss']:.4f}, {_epoch_result(event)}, "
                       f"{event['epoch_s']:.1f} s")

    def finish_cell(self, label: str, record: dict) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        self._line(f"[{self.done}/{self.total}] {label}: {_outcome(record)}  "
                   f"(elapsed {elapsed:.0f} s, ETA {eta:.0f} s)")


class _RichBar:
    def __init__(self, total: int, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
        self.matrix = self.progress.add_task("cells", total=total)
        self.cell = self.progress.add_task("", total=None, visible=False)

    def start_cell(self, label: str) -> None:
        self.label = label
        self.progress.update(self.cell, description=f"  {label}", total=None, completed=0, visible=True)

    def event(self, event: dict) -> None:
        if event.get("event") == "epoch":
            self.progress.update(self.cell, total=event["epochs"], completed=event["epoch"],
                                 description=f"  {self.label}: {event['stage']} epoch {event['epoch']}/"
                                             f"{event['epochs']}, {_epoch_result(event, 3)}")

    def finish_cell(self, label: str, record: dict) -> None:
        self.progress.console.print(f"{label}: {_outcome(record)}")
        self.progress.advance(self.matrix)


class Progress:
    """What the runner talks to; picks rich on a terminal."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.console = None
        if self.stream.isatty():
            try:
                from rich.console import Console

                self.console = Console(file=self.stream)
            except ImportError:
                pass

    def print(self, text: str) -> None:
        print(text, flush=True)

    def info(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def warn(self, text: str) -> None:
        self.info(f"WARNING: {text}" if self.console is None else f"\x1b[1;33mWARNING: {text}\x1b[0m")

    def error(self, text: str) -> None:
        """The one line that says why a run stopped early."""
        self.info(f"tribench: error: {text}")

    @contextlib.contextmanager
    def matrix(self, total: int):
        if self.console is None:
            yield _PlainBar(total, self.stream)
            return
        bar = _RichBar(total, self.console)
        with bar.progress:
            yield bar
