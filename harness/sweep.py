"""Batch-size sweep: throughput and peak memory against batch size per backend, with a plot."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

from harness.report import mode_text
from harness.results import read_records
from harness.runner import RunConfig, run_matrix
from harness.stats import format_stat, group_cells, ok_records, summarise_figure
from harness.storage import write_atomic

SWEEP_MD, SWEEP_PNG = "sweep.md", "sweep.png"


def run_sweep(base: RunConfig, batch_sizes: list[int]) -> int:
    """One run folder per batch size under base.out, then one table and one plot over all."""
    code = 0
    for size in batch_sizes:
        cfg = dataclasses.replace(base, batch_size=size, out=base.out / f"batch-{size}")
        result = run_matrix(cfg, write_report=False)
        if result >= 128:  # interrupted: keep what finished, draw what there is
            code = result
            break
        code = max(code, result)
    records = [r for size in batch_sizes for r in read_records(base.out / f"batch-{size}")]
    paths = write_sweep(records, base.out)
    print(paths[0].read_text())
    print(f"plot: {paths[1]}")
    return code


def _rows(records: list[dict]) -> list[tuple]:
    """(task, backend, device, batch size, throughput summary, host peak summary, device peak summary, mode).

    The mode is per point: under --mode best each batch size's probe may choose differently.
    """
    rows = []
    for (task, backend, device), cell in group_cells(ok_records(records)).items():
        for size in sorted({r["spec"]["batch_size"] for r in cell}):
            same = [r for r in cell if r["spec"]["batch_size"] == size]
            rows.append((task, backend, device, size, summarise_figure(same, "train_samples_per_s"),
                         summarise_figure(same, "peak_rss_mb"), summarise_figure(same, "device_peak_mb"),
                         ", ".join(sorted({mode_text(r["env"]) for r in same}))))
    return sorted(rows, key=lambda row: row[:4])


def write_sweep(records: list[dict], out: Path) -> tuple[Path, Path]:
    out = Path(out)
    rows = _rows(records)
    ok = ok_records(records)
    data = sorted({f"{'SYNTHETIC' if r['data']['synthetic'] else 'real'} {r['data']['name']} "
                   f"({r['data']['n_train']} train)" for r in ok})
    versions = sorted({f"{r['env'].get('framework')} {r['env'].get('framework_version')}" for r in ok})
    repeats = max((r["repeat"] + 1 for r in ok), default=0)
    source = f"{'; '.join(data)}; {', '.join(versions)}; {repeats} repeat(s) per point"
    lines = ["# Batch-size sweep", "", f"Data and versions: {source}. Throughput is steady state "
             "(warm-up excluded); cells are the median over repeats with their spread.", "",
             "| task | backend | device | batch size | mode | train samples/s | peak host RSS (MiB) "
             "| device peak (MiB) |",
             "|---|---|---|---:|---|---:|---:|---:|"]
    for task, backend, device, size, rate, host, dev, mode in rows:
        lines.append(f"| {task} | {backend} | {device} | {size} | {mode} | {format_stat(rate, ',.0f')} | "
                     f"{format_stat(host, ',.0f')} | {format_stat(dev, ',.0f')} |")
    for r in records:
        if r["status"] != "ok":
            size = (r.get("spec") or {}).get("batch_size")
            lines.append(f"\n{r['status'].upper()}: {r['task']} / {r['backend']} batch {size}: {r['error']}")
    md = out / SWEEP_MD
    write_atomic(md, ("\n".join(lines) + "\n").encode())
    png = out / SWEEP_PNG
    buffer = io.BytesIO()
    plot_sweep(rows, buffer, title_note=source)
    write_atomic(png, buffer.getvalue())
    return md, png


def plot_sweep(rows: list[tuple], path, *, title_note: str) -> None:  # path: a file name or a binary file
    from harness.plots import _pyplot

    plt = _pyplot()
    fig, (ax_rate, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.4))
    series: dict[tuple, list] = {}
    for task, backend, device, size, rate, host, dev, _ in rows:
        series.setdefault((task, backend, device), []).append((size, rate, host, dev))
    for (task, backend, device), points in series.items():
        sizes = [p[0] for p in points]
        label = f"{backend} ({device})" + (f", {task}" if len({k[0] for k in series}) > 1 else "")
        medians = [p[1]["median"] for p in points]
        low = [p[1]["median"] - p[1]["min"] for p in points]
        high = [p[1]["max"] - p[1]["median"] for p in points]
        line = ax_rate.errorbar(sizes, medians, yerr=[low, high], marker="o", capsize=3, label=label)
        ax_mem.plot(sizes, [p[2]["median"] for p in points], marker="o", color=line[0].get_color(),
                    label=f"{label} host RSS")
        if any(p[3]["n"] for p in points):
            ax_mem.plot(sizes, [p[3]["median"] for p in points], marker="s", linestyle="--",
                        color=line[0].get_color(), label=f"{label} device")
    all_sizes = sorted({row[3] for row in rows})
    for ax in (ax_rate, ax_mem):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_sizes, [str(s) for s in all_sizes])
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # from zero, with room for the legend
        ax.set_xlabel("batch size (log scale)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax_rate.set_ylabel("training throughput (samples/s)")
    ax_rate.set_title("Throughput against batch size")
    ax_mem.set_ylabel("peak memory (MiB)")
    ax_mem.set_title("Peak memory against batch size")
    fig.suptitle(f"Batch-size sweep: {title_note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
