"""The probe's pick against the better mode: each cell forced eager, forced compiled and best, as one markdown table.

    python -m tests.bench.mode_pick --out results/bench/mode-pick [--repeats 3] [--task T,...] [--backend B,...]

Per task, three `tribench run --quick` runs (with --full, at the tasks' own sizes) in a row
(eager, compiled, best; each --repeats times, so a burst of load hits all three), each into
OUT/<task>/<mode>; then the table goes to OUT/mode-pick.md and stdout (docs/modes.md explains
its columns). `--table-only` rebuilds the table from the folders already there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from backends.base import MODES
from harness import load
from harness.results import RECORDS_FILE, read_records
from harness.stats import beyond_spread, format_stat, summarise

RUN_MODES = (*MODES, "best")
NONE = "\u2014"  # em dash: no value
HEADER = ("| task | backend | eager samples/s | compiled samples/s | better | best chose (probe) | "
          "best achieved samples/s | probe estimates c / e | pick | max load |")


def run_all(out: Path, tasks: list[str], backends: list[str], repeats: int, extra: list[str], *,
            quick: bool = True) -> None:
    """The three runs of every task, task by task; a failed run leaves its cells out of the table, not the rest."""
    for task in tasks:
        for mode in RUN_MODES:
            folder = out / task / mode
            if (folder / RECORDS_FILE).exists():
                continue  # already measured: rerunning a bench only fills in what is missing
            cmd = [sys.executable, "-m", "harness", "run", *(["--quick"] if quick else []), "--task", task,
                   "--backend", ",".join(backends), "--mode", mode, "--repeats", str(repeats), "--out", str(folder),
                   *extra]
            print("$", " ".join(cmd[1:]), flush=True)
            # The probe is what is measured: no decision from the mode cache.
            subprocess.run(cmd, check=False, env={**os.environ, "TRIBENCH_MODE_CACHE": "off"})


def rates(records: list[dict], backend: str) -> list[float]:
    return [r["metrics"].get("train_samples_per_s") for r in records
            if r.get("backend") == backend and r.get("status") == "ok"]


def row(task: str, backend: str, runs: dict[str, list[dict]]) -> str:
    """One table row from the task's three runs (`runs[mode]`: that run's records)."""
    forced = {mode: summarise(rates(runs.get(mode, []), backend)) for mode in MODES}
    best_runs = [r for r in runs.get("best", []) if r.get("backend") == backend and r.get("status") == "ok"]
    achieved = summarise(rates(best_runs, backend))
    deciding = min(best_runs, key=lambda r: r.get("repeat", 0), default=None)
    chosen = ((deciding or {}).get("env") or {}).get("mode")
    probe = ((deciding or {}).get("metrics") or {}).get("mode_probe") or {}
    # A forced "compiled" that runs the eager program is recorded as eager: one program, nothing to pick.
    programs = {((r.get("env") or {}).get("execution")) for mode in MODES for r in runs.get(mode, [])
                if r.get("backend") == backend and r.get("status") == "ok"}
    medians = {mode: forced[mode]["median"] for mode in MODES if forced[mode]["median"] is not None}
    better = max(medians, key=medians.get) if len(medians) == len(MODES) else None
    if better and len(programs) == 1:
        better, verdict = "one program", "ok (one program)"
    elif better is None or chosen is None:
        verdict = "n/a"
    elif chosen == better:
        verdict = "ok (the better mode)"
    else:
        gap = beyond_spread(forced[better], forced[chosen], higher_is_better=True)
        verdict = {True: f"WRONG ({medians[chosen] / medians[better] - 1:+.0%}, beyond the spread)",
                   False: f"ok (within the noise, {medians[chosen] / medians[better] - 1:+.0%})",
                   None: "n/a (one repeat)"}[gap]
    why = "budget" if probe.get("untried") else f"{probe.get('rounds', 0)} rounds" if probe else "no probe"
    estimates = " / ".join(f"{probe[m]:,.0f}" if probe.get(m) else "untried" if m in probe.get("untried", {})
                           else NONE for m in MODES) if probe else NONE
    loads = [v[0] for rs in runs.values() for r in rs if r.get("backend") == backend
             for v in (((r.get("env") or {}).get("load") or {}).get(k) for k in ("start", "end")) if v]
    cells = [task, backend, format_stat(forced["eager"], ",.0f"), format_stat(forced["compiled"], ",.0f"),
             better or NONE, f"{chosen or NONE} ({why})", format_stat(achieved, ",.0f"), estimates, verdict,
             f"{max(loads):.1f}" if loads else NONE]
    return "| " + " | ".join(cells) + " |"


def table(out: Path, tasks: list[str], backends: list[str]) -> str:
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for task in tasks:
        runs = {mode: read_records(out / task / mode / RECORDS_FILE) for mode in RUN_MODES
                if (out / task / mode / RECORDS_FILE).exists()}
        lines += [row(task, backend, runs) for backend in backends]
    cores = os.cpu_count() or 1
    lines.append(f"\nLoad when the table was written: {load.snapshot()['loadavg']} on {cores} cores "
                 "(max load: the highest 1-minute load average at the start or end of the row's cells).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from harness.runner import available_backends
    from tasks import DEFAULT_TASKS

    parser = argparse.ArgumentParser(prog="python -m tests.bench.mode_pick", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--task", default=",".join(DEFAULT_TASKS), help="comma-separated (default: tribench's)")
    parser.add_argument("--backend", default=None, help="comma-separated (default: every installed one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--full", action="store_true",
                        help="the tasks' own sizes instead of --quick: the probe then has a budget to probe with")
    args, extra = parser.parse_known_args(argv)  # anything else goes to every `tribench run` (e.g. --epochs 3)
    tasks = args.task.split(",")
    backends = args.backend.split(",") if args.backend else available_backends()
    if not args.table_only:
        run_all(args.out, tasks, backends, args.repeats, extra, quick=not args.full)
    text = table(args.out, tasks, backends)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mode-pick.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
