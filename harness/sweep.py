"""Sweeps of batch size or data-parallel replicas: throughput, scaling efficiency and peak memory, with a plot."""

from __future__ import annotations

import dataclasses
import io
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.figures import DEVICE_PEAK, PEAK_RSS, TRAIN_RATE
from harness.report import mode_text
from harness.results import read_records
from harness.run_config import RunConfig
from harness.runner import run_matrix
from harness.stats import data_label, format_stat, group_cells, ok_records, summarise_figure
from harness.storage import write_atomic

SWEEP_MD, SWEEP_PNG = "sweep.md", "sweep.png"


@dataclass(frozen=True)
class Axis:
    """What a sweep varies: the RunConfig field, its run folders, and how a record says its value."""

    field: str
    folder: str  # run folder prefix: batch-64, dp-2
    label: str
    value: Callable[[dict], int]


BATCH_SIZE = Axis("batch_size", "batch", "batch size", lambda r: r["spec"]["batch_size"])
DATA_PARALLEL = Axis("data_parallel", "dp", "data-parallel replicas",
                     lambda r: (r.get("env") or {}).get("data_parallel") or 1)


def run_sweep(base: RunConfig, axis: Axis, values: list[int]) -> int:
    """One run folder per value under base.out, then one table and one plot over all."""
    code = 0
    for value in values:
        cfg = dataclasses.replace(base, **{axis.field: value}, out=base.out / f"{axis.folder}-{value}")
        result = run_matrix(cfg, write_report=False)
        if result >= 128:  # interrupted: keep what finished, draw what there is
            code = result
            break
        code = max(code, result)
    records = [r for value in values for r in read_records(base.out / f"{axis.folder}-{value}")
               if (base.out / f"{axis.folder}-{value}").is_dir()]
    paths = write_sweep(records, base.out, axis)
    print(paths[0].read_text())
    print(f"plot: {paths[1]}")
    return code


def _rows(records: list[dict], axis: Axis) -> list[tuple]:
    """(task, backend, device, axis value, throughput summary, host peak summary, device peak summary, mode).

    The mode is per point: under --mode best each point's probe may choose differently.
    """
    rows = []
    for (task, backend, device), cell in group_cells(ok_records(records)).items():
        for value in sorted({axis.value(r) for r in cell}):
            same = [r for r in cell if axis.value(r) == value]
            rows.append((task, backend, device, value, summarise_figure(same, TRAIN_RATE.name),
                         summarise_figure(same, PEAK_RSS.name), summarise_figure(same, DEVICE_PEAK.name),
                         ", ".join(sorted({mode_text(r["env"]) for r in same}))))
    return sorted(rows, key=lambda row: row[:4])


def scaling_efficiency(rows: list[tuple]) -> dict[tuple, float | None]:
    """(task, backend, device, N) -> median throughput at N over N x the median at 1 replica (None without N=1)."""
    single = {row[:3]: row[4]["median"] for row in rows if row[3] == 1}
    return {row[:4]: (row[4]["median"] / (row[3] * single[row[:3]]) if row[:3] in single else None)
            for row in rows}


def write_sweep(records: list[dict], out: Path, axis: Axis = BATCH_SIZE) -> tuple[Path, Path]:
    out = Path(out)
    rows = _rows(records, axis)
    ok = ok_records(records)
    data = sorted({data_label(r["data"]) for r in ok})
    versions = sorted({f"{r['env'].get('framework')} {r['env'].get('framework_version')}" for r in ok})
    precisions = sorted({str(r["env"].get("precision")) for r in ok})
    repeats = max((r["repeat"] + 1 for r in ok), default=0)
    source = f"{'; '.join(data)}; {', '.join(versions)}; {', '.join(precisions)}; {repeats} repeat(s) per point"
    dp = axis is DATA_PARALLEL
    title = "Data-parallel sweep" if dp else "Batch-size sweep"
    lines = [f"# {title}", "", f"Data, versions and precision: {source}. Throughput is steady state "
             "(warm-up excluded); cells are the median over repeats with their spread."]
    if dp:
        batches = sorted({r["spec"]["batch_size"] for r in ok})
        cpu = any(row[2] == "cpu" for row in rows)
        lines += ["", f"Global batch {', '.join(map(str, batches))}, split evenly over the replicas. Scaling "
                  "efficiency = throughput at N / (N x throughput at 1 replica); 100% is perfect scaling."]
        if cpu:
            lines += ["", "On a CPU the replicas are logical devices (or processes) sharing the same cores: "
                      "the figures show the cost of each framework's data-parallel machinery (splitting, "
                      "all-reduce, replica bookkeeping), not a speed-up from more hardware; efficiency near "
                      "1/N is expected there."]
    efficiency = scaling_efficiency(rows)
    lines += ["", f"| task | backend | device | {axis.label} | mode | train samples/s |"
              + (" scaling efficiency |" if dp else "") + " peak host RSS (MiB) | device peak (MiB) |",
              "|---|---|---|---:|---|---:|" + ("---:|" if dp else "") + "---:|---:|"]
    for task, backend, device, value, rate, host, dev, mode in rows:
        eff = efficiency[(task, backend, device, value)]
        lines.append(f"| {task} | {backend} | {device} | {value} | {mode} | {format_stat(rate, ',.0f')} | "
                     + (f"{'n/a' if eff is None else f'{100 * eff:.0f}%'} | " if dp else "")
                     + f"{format_stat(host, ',.0f')} | {format_stat(dev, ',.0f')} |")
    for r in records:
        if r["status"] != "ok":
            where = f"{axis.label} {axis.value(r) if r.get('spec') else '?'}"
            lines.append(f"\n{r['status'].upper()}: {r['task']} / {r['backend']} {where}: {r['error']}")
    md = out / SWEEP_MD
    write_atomic(md, ("\n".join(lines) + "\n").encode())
    png = out / SWEEP_PNG
    buffer = io.BytesIO()
    plot_sweep(rows, buffer, axis=axis, title_note=source)
    write_atomic(png, buffer.getvalue())
    return md, png


def plot_sweep(rows: list[tuple], path, *, axis: Axis, title_note: str) -> None:  # path: a file or a binary file
    from harness.plots import _pyplot

    plt = _pyplot()
    dp = axis is DATA_PARALLEL
    fig, axes = plt.subplots(1, 3 if dp else 2, figsize=(16 if dp else 11, 4.4))
    ax_rate, ax_mem = axes[0], axes[-1]
    efficiency = scaling_efficiency(rows)
    series: dict[tuple, list] = {}
    for task, backend, device, value, rate, host, dev, _ in rows:
        series.setdefault((task, backend, device), []).append((value, rate, host, dev))
    for (task, backend, device), points in series.items():
        xs = [p[0] for p in points]
        label = f"{backend} ({device})" + (f", {task}" if len({k[0] for k in series}) > 1 else "")
        medians = [p[1]["median"] for p in points]
        low = [p[1]["median"] - p[1]["min"] for p in points]
        high = [p[1]["max"] - p[1]["median"] for p in points]
        line = ax_rate.errorbar(xs, medians, yerr=[low, high], marker="o", capsize=3, label=label)
        color = line[0].get_color()
        ax_mem.plot(xs, [p[2]["median"] for p in points], marker="o", color=color, label=f"{label} host RSS")
        if any(p[3]["n"] for p in points):
            ax_mem.plot(xs, [p[3]["median"] for p in points], marker="s", linestyle="--", color=color,
                        label=f"{label} device")
        if dp:
            eff = [(x, efficiency[(task, backend, device, x)]) for x in xs]
            eff = [(x, 100 * e) for x, e in eff if e is not None]
            axes[1].plot([x for x, _ in eff], [e for _, e in eff], marker="o", color=color, label=label)
    values = sorted({row[3] for row in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xlabel(f"{axis.label} (log scale)")
        ax.grid(alpha=0.3, which="both")
    rates = [row[4]["median"] for row in rows if row[4]["median"]]
    if rates and max(rates) > 30 * min(rates):  # tasks of very different speed: a linear axis hides the slow
        ax_rate.set_yscale("log")
    else:
        ax_rate.set_ylim(0, ax_rate.get_ylim()[1] * 1.12)  # from zero, with room for the legend
    ax_mem.set_ylim(0, ax_mem.get_ylim()[1] * 1.12)
    for ax in (ax_rate, ax_mem):
        ax.legend(fontsize=8)
    ax_rate.set_ylabel("training throughput (samples/s)")
    ax_rate.set_title(f"Throughput against {axis.label}")
    ax_mem.set_ylabel("peak memory (MiB)")
    ax_mem.set_title(f"Peak memory against {axis.label}")
    if dp:
        axes[1].axhline(100, color="grey", linestyle=":", linewidth=1, label="perfect scaling")
        shown = [100 * e for e in efficiency.values() if e is not None]
        axes[1].set_ylim(0, max([110.0, *shown]) * 1.05)
        axes[1].set_ylabel("scaling efficiency (%)")
        axes[1].set_title("Throughput at N / (N x throughput at 1)")
        axes[1].legend(fontsize=8)
    title = f"{'Data-parallel' if dp else 'Batch-size'} sweep: {title_note}"
    fig.suptitle("\n".join(textwrap.wrap(title, 160)), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
