"""Runs a planned matrix of cells through an executor into one locked results folder, then reports."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
from pathlib import Path

from backends import BACKENDS
from backends.base import BEST
from harness import confine, folderlock
from harness import data as data_mod
from harness.cells import FINISHED, Cell, deciding_first, pinned_modes, plan, resolve_data
from harness.confine import UntrustedInput
from harness.errors import EXIT_CELL_FAILED, EXIT_OK, EXIT_USAGE, Interrupted, UsageError
from harness.executor import Executor, LocalExecutor
from harness.results import RECORDS_FILE, append_record, read_records
from harness.run_config import RUN_FILE, RunConfig, check_resumed_data, write_run_file
from harness.shard import in_shard
from harness.storage import set_aside_torn_tail
from tasks import get_task

log = logging.getLogger(__name__)




def prepare_out_dir(out: Path) -> None:
    """Fail before any cell runs when the results cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write results to {out}: {exc.strerror or exc}") from None


def run_matrix(cfg: RunConfig, *, resume: bool = False, ui=None, write_report: bool = True,
               executor: Executor | None = None) -> int:
    """Run every planned cell of this shard not already finished; returns the process exit code.

    `executor` decides where cells run (default: LocalExecutor, one subprocess at a time here).
    The folder is locked for the whole run (folderlock), so a second run or a resume
    into a live folder stops before it reads or writes anything.
    """
    from harness.progress import Progress

    ui = ui or Progress()
    created = not os.path.lexists(cfg.out)
    prepare_out_dir(cfg.out)
    try:
        with folderlock.hold(cfg.out):
            return _run_locked(cfg, resume=resume, ui=ui, write_report=write_report, executor=executor)
    except folderlock.FolderBusy as exc:
        raise UsageError(str(exc)) from None
    except (UsageError, UntrustedInput, data_mod.DataError):
        if created:  # refused before anything was written: leave no folder holding only the lock
            remove_if_only_lock(cfg.out)
        raise


def remove_if_only_lock(folder: Path) -> None:
    """Remove `folder` if it holds nothing but the lock (a run refused before its first write)."""
    with contextlib.suppress(OSError):
        if [p.name for p in folder.iterdir()] == [folderlock.LOCK_FILE]:
            (folder / folderlock.LOCK_FILE).unlink()
            folder.rmdir()


def _run_locked(cfg: RunConfig, *, resume: bool, ui, write_report: bool, executor: Executor | None) -> int:
    records_path = cfg.out / RECORDS_FILE
    if resume:
        for name in ("data_dir", "init_from"):
            if getattr(cfg, name):
                ui.info(f"--resume: {name} from {cfg.out / RUN_FILE}: {getattr(cfg, name)}")
    sources = resolve_data(cfg)
    try:
        confine.inside(cfg.out, RECORDS_FILE)  # a symlink there is refused, never appended through
        confine.inside(cfg.out, "checkpoints")  # workers write checkpoints there: never through a symlink
        side = set_aside_torn_tail(records_path)
        if not resume:
            if records_path.exists() and records_path.stat().st_size:
                raise UsageError(f"{cfg.out} already holds records; use --resume {cfg.out} or another --out")
            write_run_file(cfg, sources)
    except OSError as exc:
        raise UsageError(f"cannot write results to {cfg.out}: {_os_error(exc)}") from None
    if side:
        ui.warn(f"{records_path} ended in half a record (a crash or a full disk); it was moved to {side}")
    done = {(r.get("task"), r.get("backend"), r.get("repeat")) for r in read_records(records_path)
            if r.get("status") in FINISHED} if resume else set()
    if resume:
        check_resumed_data(cfg, sources)
    for task, (name, where, why) in sources.items():
        if name == "synthetic":
            ui.warn(f"{task}: SYNTHETIC data (generated from the seed, not {get_task(task).dataset}) [{why}]")
        else:
            ui.info(f"{task}: real data {name} from {where} [{why}]")
    cells = [c for c in in_shard(plan(cfg), cfg.shard) if c.key not in done]
    if done:
        ui.info(f"resuming {cfg.out}: {len(done)} cells already finished, {len(cells)} to run")

    executor = executor or LocalExecutor()
    # Before our handlers go in: starting Ray installs a SIGTERM handler of its own.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    executor.start(cfg)

    def interrupt(signum, frame):
        raise Interrupted(signum)

    for sig in previous:
        signal.signal(sig, interrupt)
    code, stored = EXIT_OK, 0
    try:
        with ui.matrix(len(cells)) as bar:
            def on_record(cell: Cell, record: dict) -> None:
                nonlocal stored
                append_record(records_path, record)
                stored += 1
                bar.finish_cell(cell.label, record)

            if cfg.mode == BEST:  # each cell's first repeat decides; the others then train in its choice
                deciding, rest = deciding_first(cells, pinned_modes(read_records(records_path)))
                executor.run(cfg, deciding, sources, bar=bar, on_record=on_record)
                pins = pinned_modes(read_records(records_path))
                for cell in rest:
                    cell.pinned_mode = pins.get((cell.task, cell.backend))
                executor.run(cfg, rest, sources, bar=bar, on_record=on_record)
            else:
                executor.run(cfg, cells, sources, bar=bar, on_record=on_record)
    except Interrupted as exc:
        executor.stop()
        ui.warn(f"interrupted by {exc}: finished cells are in {records_path}; "
                f"continue with: tribench run --resume {cfg.out}")
        code = 128 + exc.signum
    except OSError as exc:  # a full disk, mostly: stop at once, keep every whole record
        executor.stop()
        records = read_records(records_path)
        ui.error(f"run stopped after {stored} of {len(cells)} cells: {_os_error(exc)}; the {len(records)} "
                 f"records in {records_path} are whole; free space, then: tribench run --resume {cfg.out}")
        return EXIT_CELL_FAILED if records else EXIT_USAGE
    finally:
        executor.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    records = read_records(records_path)
    if not finish(cfg.out, records, ui, write_report=write_report) and code == EXIT_OK:
        code = EXIT_CELL_FAILED
    if code == EXIT_OK and any(r.get("status") in ("failed", "diverged") for r in records):
        code = EXIT_CELL_FAILED
    return code


def _os_error(exc: OSError) -> str:
    """'PATH: reason' of an OSError, on one line."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def finish(out: Path, records: list[dict], ui, *, write_report: bool = True) -> bool:
    """The summary table and the report, also after an interruption; False if the report could not be written."""
    from harness import report

    ui.print(report.render_terminal(records))
    written = True
    if write_report:
        try:
            paths = report.write_report(out, records=records)
            ui.info(f"report: {paths[0].parent / 'report.html'}")
        except OSError as exc:  # a full disk: one line, the records are safe
            ui.error(f"report not written: cannot write {_os_error(exc)}; the records are in {out / RECORDS_FILE}")
            written = False
        except Exception:  # a broken plot must not hide the records that are safe on disk
            log.exception("writing the report failed; the records are in %s", out / RECORDS_FILE)
    for r in records:
        if r.get("status") in ("failed", "diverged"):
            ui.warn(f"{r['status'].upper()}: {r.get('task')} / {r.get('backend')} / repeat {r.get('repeat')}: "
                    f"{r.get('error')}")
    return written


def available_backends() -> list[str]:
    return [name for name, info in BACKENDS.items() if info.available()]
