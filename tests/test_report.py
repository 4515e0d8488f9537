"""Report tests: tables, parity and environment, PNG plots, a self-contained HTML that loads in Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from record_factory import make_record, make_run, write_run

from harness import report, stats
from harness.stats import format_stat, summarise

# Its module fixture is costly: every test of the module runs in the same test process (pytest-xdist).
pytestmark = pytest.mark.xdist_group("test_report")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = "/usr/bin/chromium"
BACKENDS = ("torch", "tensorflow", "jax")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Three tasks x three backends x 3 repeats, a GPU cell, a failure and a skip: written once."""
    records = make_run(tasks=("mnist-mlp", "finetune"), backends=BACKENDS, repeats=3, jitter=0.05)
    records += make_run(tasks=("mnist-mlp",), backends=("torch",), repeats=2, device="cuda:0", roofline=True)
    records.append(make_record("finetune", "jax", 0, status="failed", device="gpu"))
    records.append(make_record("finetune", "mxnet", 0, status="skipped"))
    run_dir = write_run(tmp_path_factory.mktemp("run") / "2024-06-01T120000Z", records)
    return run_dir, report.write_report(run_dir)


# -- stats --------------------------------------------------------------------------------

def test_summarise_ignores_none_and_computes_quartiles():
    s = summarise([3, None, 1, 2, 5, 4])
    assert (s["n"], s["median"], s["min"], s["max"], s["q1"], s["q3"]) == (5, 3, 1, 5, 2, 4)
    assert summarise([None])["n"] == 0 and summarise([])["median"] is None


@pytest.mark.parametrize("values, expected", [
    ([1000], "1,000 (n=1)"),
    ([1000, 1100, 1200], "1,100 [1,000\u20131,200]"),
    ([1000, 1100, 1200, 1300, 1400], "1,200 (IQR 1,100\u20131,300)"),
    ([], "\u2014"),
])
def test_format_stat_never_shows_one_run_as_a_distribution(values, expected):
    assert format_stat(summarise(values), ",.0f") == expected


# -- tables ------------------------------------------------------------------------------

def test_summary_table_rows_and_statuses():
    records = make_run(backends=BACKENDS, repeats=2) + [make_record("mnist-mlp", "jax", 2, status="diverged")]
    records.append(make_record("mnist-mlp", "mxnet", 0, status="skipped"))
    table = report.summary_table(records)
    assert list(table["backend"]) == ["jax", "mxnet", "tensorflow", "torch"]
    jax = table[table["backend"] == "jax"].iloc[0]
    assert jax["status"] == "ok 2/3, 1 diverged" and "nan" in jax["error"] and jax["n"] == 2
    skipped = table[table["backend"] == "mxnet"].iloc[0]
    assert skipped["status"] == "skipped" and "pip install" in skipped["error"]
    assert "[" in jax["train samples/s"]  # two repeats: median [min-max]


def test_finetune_extras_and_speedup_column():
    table = report.summary_table(make_run(tasks=("finetune",), backends=("torch",), repeats=1))
    sub = report.task_table(table, "finetune")
    assert sub.loc[0, "freezing speed-up"] == "1.80x (n=1)"
    assert "finetuned accuracy" in sub and "scratch accuracy" in sub
    plain = report.task_table(report.summary_table(make_run(backends=("torch",))), "mnist-mlp")
    assert "freezing speed-up" not in plain and "error" not in plain


def test_parity_line_reports_gap_and_initial_loss_agreement():
    records = make_run(backends=("torch",), accuracy=0.975) + make_run(backends=("jax",), accuracy=0.970)
    line = report.parity_line(records)
    assert "0.50 points" in line and "agree" in line and "DISAGREE" not in line
    records[-1]["metrics"]["initial_test_loss"] += 0.1
    assert "DISAGREE" in report.parity_line(records)
    assert "only one backend" in report.parity_line(make_run(backends=("torch",)))


def test_terminal_summary_is_loud_about_synthetic_data():
    text = report.render_terminal(make_run(backends=BACKENDS, synthetic=True))
    assert "SYNTHETIC DATA" in text and "!!!" in text and all(b in text for b in BACKENDS)
    assert "n=1" in text
    assert "SYNTHETIC" not in report.render_terminal(make_run(backends=("torch",)))


# -- written report ----------------------------------------------------------------------

def test_report_files_hold_parity_environment_and_every_backend(full_run):
    run_dir, paths = full_run
    names = {p.name for p in paths}
    assert {"report.md", "report.html", "accuracy_vs_time.png", "epoch_curves.png", "throughput.png",
            "memory.png"} <= names
    for page in ("report.md", "report.html"):
        text = (run_dir / page).read_text(encoding="utf-8")
        assert text.count("Parity:") == 2  # one per task
        for label in ("Environment", "Machine", "CPU", "GPU", "Python", "Frameworks", "Threads", "Precision",
                      "Git commit", "Data (mnist-mlp)", "NVIDIA H100", "torch 2.3.1", "jax 0.4.30"):
            assert label in text, (page, label)
        for backend in (*BACKENDS, "mxnet"):
            assert backend in text
        assert "freezing speed-up" in text and "roofline" in text and "skipped" in text


def test_pngs_are_valid_images(full_run):
    from matplotlib import image

    _, paths = full_run
    pngs = [p for p in paths if p.suffix == ".png"]
    assert len(pngs) == 4
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
        h, w = image.imread(p).shape[:2]
        assert w > 400 and h > 300


def test_plots_drawn_in_processes_are_the_ones_drawn_in_this_process(full_run, tmp_path, monkeypatch):
    """On several cores the plots are drawn in a pool of processes; on one, here: the same PNG bytes."""
    from harness import plots
    from harness.results import read_records

    run_dir, paths = full_run
    pooled = {p.name: p.read_bytes() for p in paths if p.suffix == ".png"}
    if plots.available_cores() < 2:
        pytest.skip("one core: the report above drew its plots in this process too")
    monkeypatch.setattr(plots, "available_cores", lambda: 1)
    here = {p.name: p.read_bytes() for p, _ in plots.write_plots(read_records(run_dir), tmp_path)}
    assert here.keys() == pooled.keys() and len(here) == len(plots.PLOTS)
    assert all(here[name] == pooled[name] for name in here)


def test_html_references_nothing_external(full_run):
    run_dir, _ = full_run
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", page, flags=re.I)
    refs += re.findall(r"url\(([^)]*)\)|@import", page)
    assert refs and all(r.startswith("data:") for r in refs if r), refs
    assert "<link" not in page.lower()


@pytest.mark.parametrize("records", [
    pytest.param([make_record(status="failed"), make_record(backend="jax", status="skipped")], id="only-failures"),
    pytest.param(make_run(backends=("torch",)), id="one-backend-one-repeat"),
    pytest.param([], id="no-records"),
])
def test_report_for_degenerate_runs(tmp_path, records):
    paths = report.write_report(write_run(tmp_path, records))
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.html").exists()
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    if not stats.ok_records(records):
        assert "nothing to plot" in md and not [p for p in paths if p.suffix == ".png"]
        for r in records:
            assert r["status"] in md and r["error"].split(":")[0] in md
    else:
        assert "(n=1)" in md and "only one backend" in md


# -- the page in a real browser ----------------------------------------------------------

IMG_CHECK = """<img alt="sentinel" src="data:image/png;base64,bm90IGEgcG5n">
<script>window.addEventListener("load", function () {
  var out = [];
  document.querySelectorAll("img").forEach(function (img) {
    var loaded = img.complete && img.naturalWidth > 0;
    out.push((img.alt === "sentinel" ? "sentinel=" : "img=") + (loaded ? "ok" : "broken"));
  });
  var pre = document.createElement("pre");
  pre.id = "imgcheck";
  pre.textContent = out.join(" ");
  document.body.appendChild(pre);
});</script></body>"""


def _dump_dom(page: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """`page` (a copy of the report with a checking script) loaded in headless Chromium; stdout holds its DOM."""
    probe = tmp_path / "probe.html"
    probe.write_text(page, encoding="utf-8")
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", *flags,
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"Chromium not installed at {CHROMIUM} (Debian: apt install chromium)")
def test_every_image_loads_in_headless_chromium(full_run, tmp_path):
    run_dir, _ = full_run
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    # The check runs on a copy: the report itself carries no script. A deliberately broken
    # sentinel image proves the check can fail.
    out = _dump_dom(page.replace("</body>", IMG_CHECK), tmp_path)
    found = re.search(r'<pre id="imgcheck">(.*?)</pre>', out.stdout)
    assert found, f"no result in the DOM; chromium rc={out.returncode}, stderr tail: {out.stderr[-800:]}"
    results = found.group(1).split()
    assert results.count("sentinel=broken") == 1
    images = [r for r in results if r.startswith("img=")]
    assert len(images) == 4 and all(r == "img=ok" for r in images), results


def test_the_stamp_is_the_runs_own_time_not_the_reports(tmp_path):
    from harness.report import write_report

    records = make_run(backends=("torch",))
    records[0]["started_at"], records[0]["finished_at"] = "2024-06-01T12:00:00Z", "2024-06-01T12:07:00+00:00"
    folder = write_run(tmp_path / "run", records)
    write_report(folder)
    title = (folder / "report.md").read_text().splitlines()[0]
    assert "run 2024-06-01 12:00\u201312:07 UTC" in title


def test_epoch_curves_draw_the_same_repeat_bold_for_every_backend():
    import io

    from harness import plots

    # jax (the first backend) has its median repeat at 0; torch's own median repeat would be 2.
    records = [make_record(backend="torch", repeat=r, accuracy=a) for r, a in ((0, 0.90), (1, 0.99), (2, 0.95))]
    records += [make_record(backend="jax", repeat=r, accuracy=a) for r, a in ((0, 0.95), (1, 0.90), (2, 0.99))]
    groups = stats.group_cells(records)
    assert [k[1] for k in groups] == ["jax", "torch"]  # cells sort by name: jax is the first backend
    assert plots._shared_repeat(groups) == 0
    assert {plots._bold(cell, 0)["repeat"] for cell in groups.values()} == {0}
    caption = plots.plot_epoch_curves(records, io.BytesIO())
    assert "the same repeat for every backend" in caption and "mnist-mlp: repeat 0 (median of jax)" in caption


def test_the_mode_column_says_which_mode_each_row_trained_in_and_who_chose_it():
    records = [make_record("mnist-mlp", "torch", r, mode="eager") for r in range(2)]
    records += [make_record("mnist-mlp", "jax", r, mode="compiled") for r in range(2)]
    for r in records[:2]:
        r["env"]["mode_requested"] = "best"  # torch: the probe chose eager; jax: forced compiled
    table = report.summary_table(records).set_index("backend")
    assert table.loc["torch", "mode"] == "eager (best)"
    assert table.loc["jax", "mode"] == "compiled"
    assert "eager (best)" in report.render_terminal(records)
    failed = make_record("mnist-mlp", "tensorflow", 0, status="failed", mode=None)
    failed["env"].update(mode=None, mode_requested="best")  # failed before its metrics were kept
    assert report.summary_table([failed]).loc[0, "mode"] == "? (best)"


# -- tasks judged by held-out loss (lower is better) ------------------------------------------

@pytest.fixture
def kept_figures(monkeypatch):
    """The figures the plot functions draw, kept open for inspection instead of closed after saving."""
    from harness import plots

    real, kept = plots._pyplot(), []

    class Keep:
        def __getattr__(self, name):
            return getattr(real, name)

        def close(self, fig):
            kept.append(fig)

    monkeypatch.setattr(plots, "_pyplot", Keep)
    yield kept
    for fig in kept:
        real.close(fig)


def _loss_run():
    """tiny-gpt on torch and jax, 3 repeats: torch's held-out losses 2.0, 1.7, 1.9 (median repeat 2), jax 1.5."""
    records = [make_record("tiny-gpt", "torch", r, test_loss=v) for r, v in ((0, 2.0), (1, 1.7), (2, 1.9))]
    return records + [make_record("tiny-gpt", "jax", r, test_loss=1.5) for r in range(3)]


def test_loss_judged_task_plots_held_out_loss_against_time_with_its_target(kept_figures):
    import io

    from harness import plots

    records = _loss_run()
    caption = plots.plot_accuracy_vs_time(records + make_run(backends=("torch",)), io.BytesIO())
    loss_ax, acc_ax = (ax for ax in kept_figures[0].axes if ax.get_visible())
    assert loss_ax.get_title().startswith("tiny-gpt") and acc_ax.get_title().startswith("mnist-mlp")
    assert loss_ax.get_ylabel() == "held-out loss (nats, lower is better)"
    assert acc_ax.get_ylabel() == "test accuracy (%)"
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    # The bold line of each backend is its held-out loss per evaluation, the untrained model first; bold is
    # the first backend's (jax's) median repeat by held-out loss: its three tie, so repeat 1, torch's 1.7.
    torch_r1 = records[1]["metrics"]
    np.testing.assert_allclose(lines["torch (cpu), n=3"].get_ydata(),
                               [torch_r1["initial_test_loss"], *torch_r1["epoch_test_loss"]])
    assert list(lines["target 1.6 nats"].get_ydata()) == [1.6, 1.6]
    assert "target 97%" in {line.get_label() for line in acc_ax.get_lines()}
    assert "tiny-gpt: held-out loss in nats, lower is better" in caption
    assert "tiny-gpt: repeat 1 (median of jax by held-out loss)" in caption


def test_loss_judged_bold_repeat_is_the_median_by_held_out_loss():
    from harness import plots

    torch = [r for r in _loss_run() if r["backend"] == "torch"]
    # By accuracy every repeat ties (and repeat 1 would be the middle one); by loss 1.7 < 1.9 < 2.0.
    assert plots._median_repeat(torch)["repeat"] == 2


def test_loss_judged_epoch_curves_overlay_held_out_loss_per_epoch(kept_figures):
    import io

    from harness import plots

    caption = plots.plot_epoch_curves(_loss_run(), io.BytesIO())
    train_ax, judged_ax = kept_figures[0].axes
    assert train_ax.get_ylabel().startswith("training loss")
    assert judged_ax.get_ylabel() == "held-out loss (nats, lower is better)"
    assert judged_ax.get_title().startswith("tiny-gpt: held-out loss")
    labels = {line.get_label() for line in judged_ax.get_lines()}
    assert {"jax (cpu), n=3", "torch (cpu), n=3", "target 1.6 nats"} <= labels
    assert "tiny-gpt: held-out loss, lower is better" in caption


def test_loss_judged_tables_say_lower_is_better_and_rank_lowest_first():
    records = _loss_run()
    table = report.task_table(report.summary_table(records), "tiny-gpt").set_index("backend")
    assert table.loc["jax", "held-out loss (lower is better)"] == "1.5000 [1.5000\u20131.5000]"
    assert table.loc["torch", "bits/byte (lower is better)"].startswith("2.741")
    line = report.judged_line(records)
    assert "Judged by held-out loss (lower is better; target 1.6 nats" in line
    assert line.endswith("best first (medians, nats): jax/cpu 1.5000, torch/cpu 1.9000.")
    # Accuracy-judged tasks rank the other way round.
    acc = make_run(backends=("torch",), accuracy=0.90) + make_run(backends=("jax",), accuracy=0.95)
    assert report.judged_line(acc).endswith("best first (medians): jax/cpu 95.00%, torch/cpu 90.00%.")
    assert "held-out loss" not in report.task_table(report.summary_table(acc), "mnist-mlp")
    text = report.render_terminal(records)
    assert "held-out loss (lower is better)" in text and "lower is better" in report.parity_line(records)


def test_a_task_with_target_loss_but_no_tokens_is_judged_by_its_loss():
    # A task file may set target_loss on an image model: no bits per byte, still judged by the loss.
    records = make_run(backends=("torch", "jax"))
    for r, loss in zip(records, (0.30, 0.25)):
        r["spec"]["target_loss"] = 0.28
        r["objective"] = "loss"  # what the worker writes for such a spec (TaskSpec.objective)
        r["metrics"]["test_loss"] = loss
    assert "held-out-loss gap" in report.parity_line(records)
    assert report.judged_line(records).endswith("jax/cpu 0.2500, torch/cpu 0.3000.")
    assert "held-out loss (lower is better)" in report.task_table(report.summary_table(records), "mnist-mlp")


def test_progress_lines_give_held_out_loss_for_a_loss_task_and_accuracy_otherwise():
    import io

    from harness.progress import _PlainBar

    out = io.StringIO()
    bar = _PlainBar(2, out)
    bar.event({"event": "epoch", "stage": "train", "epoch": 1, "epochs": 1, "train_loss": 2.0, "test_loss": 1.75,
               "test_accuracy": 0.14, "epoch_s": 1.0, "objective": "loss"})
    bar.finish_cell("tiny-gpt / jax", make_record("tiny-gpt", "jax"))
    bar.finish_cell("mnist-mlp / jax", make_record("mnist-mlp", "jax"))
    lines = out.getvalue().splitlines()
    assert "held-out loss 1.7500" in lines[0] and "accuracy" not in lines[0]
    assert "ok  held-out loss" in lines[1] and "accuracy" not in lines[1]
    assert "ok  test accuracy" in lines[2]


# -- one glance: headline, short tables and lines, no overflow ---------------------------------

def _wide_run() -> list[dict]:
    """The widest report the factory makes: three tasks (one judged by loss), 5 repeats (IQR cells),
    a GPU cell, a staged language model on its own corpus and a failure with a long unbroken error."""
    records = make_run(tasks=("mnist-mlp", "finetune", "tiny-gpt"), backends=BACKENDS, repeats=5, jitter=0.05)
    records += make_run(tasks=("mnist-mlp",), backends=("torch",), repeats=2, device="cuda:0", roofline=True)
    failed = make_record("finetune", "jax", 0, status="failed", device="gpu")
    failed["error"] = "RuntimeError: " + "x" * 300 + " and then " + "a very long explanation " * 20
    records.append(failed)
    for r in records:
        if r["task"] == "tiny-gpt":
            r["data"]["stages"] = {"finetune": dict(r["data"], name="licenses", n_train=900, n_test=100)}
            r["spec"].update(primary_stage="finetune", stages=[{"name": "pretrain"},
                                                               {"name": "finetune", "data": "licenses"}])
    return records


def _main_tables(markdown: str) -> list[list[str]]:
    """The header cells of each task's main table: the first table under each '## task' heading."""
    out = []
    for section in markdown.split("\n## ")[1:]:
        header = next((ln for ln in section.splitlines() if ln.startswith("| ")), None)
        if header and not section.startswith(("Environment", "Plots")):
            out.append([c.strip() for c in header.strip("|").split(" | ")])
    return out


def test_main_tables_have_at_most_eight_columns_and_the_rest_is_in_details(tmp_path):
    write_run(tmp_path, _wide_run())
    report.write_report(tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    mains = _main_tables(md)
    assert len(mains) == 3 and all(len(cols) <= 8 for cols in mains), mains
    assert all({"backend", "train samples/s", "mode"} <= set(cols) for cols in mains)
    # What left the main tables is still in the report, in each task's details section.
    assert md.count("<details><summary>Every figure of") == 3
    details = md.split("<details><summary>Every figure of mnist-mlp</summary>")[1].split("</details>")[0]
    for label in ("data", "eval samples/s", "peak host RSS (MiB)", "params (total / trainable)", "roofline"):
        assert f"| {label} |" in details, label
    # The long data string is in the details, not on every main-table row.
    main_rows = md.split("## mnist-mlp")[1].split("<details>")[0]
    assert "subset" not in "".join(ln for ln in main_rows.splitlines() if ln.startswith("| "))
    # The failure's error is listed under its table rather than widening it.
    assert "- jax/gpu: RuntimeError: xxx" in md


def test_terminal_lines_are_short(tmp_path):
    text = report.render_terminal(_wide_run())
    longest = max(text.splitlines(), key=len)
    # Prose wraps at 100; the 8-column table of 5-repeat IQR cells measured 116 characters.
    assert len(longest) <= 120, (len(longest), longest)
    assert "RuntimeError" in text and "a very long explanation" in text  # wrapped, not cut


def test_headline_names_the_leader_its_spread_and_whether_the_gap_exceeds_it():
    fast = make_run(backends=("jax",), repeats=3, throughput=30000.0, jitter=0.02)
    slow = make_run(backends=("torch",), repeats=3, throughput=10000.0, jitter=0.02)
    best, fastest = report.headline(fast + slow)
    # The leader with its median [min-max], then the next cell, the ratio and the verdict.
    assert re.match(r"Fastest training \(samples/s\): jax/cpu 3[56],\d{3} \[[\d,]+\u2013[\d,]+\]; "
                    r"next torch/cpu (9,9|10,0)\d\d \[[\d,]+\u2013[\d,]+\]: 3\.\d\dx as fast, beyond noise "
                    r"\(the spreads do not overlap\)\.$", fastest), fastest
    # Close rates with overlapping spreads: the same gap words, then "within noise".
    near = make_run(backends=("torch", "jax"), repeats=3)
    for r, rate in zip(near, (100.0, 120.0, 140.0, 90.0, 110.0, 130.0)):  # torch 100-140, jax 90-130
        r["metrics"]["train_samples_per_s"] = rate
    assert report.headline(near)[1] == ("Fastest training (samples/s): torch/cpu 120 [100\u2013140]; next jax/cpu "
                                        "110 [90\u2013130]: 1.09x as fast, within noise (the spreads overlap).")
    # One repeat has no spread: the line says noise cannot be told.
    one = make_run(backends=("torch",), throughput=10000.0) + make_run(backends=("jax",), throughput=10000.0)
    assert "noise unknown" in report.headline(one)[1]


def test_ties_in_accuracy_are_said_and_ordered_by_name():
    records = [make_record("mnist-mlp", b, accuracy=0.9) for b in ("torch", "tensorflow", "jax")]
    records.append(make_record("mnist-mlp", "mxnet", accuracy=0.8))
    for order in (records, records[::-1]):
        best, _ = report.headline(order)
        assert best.startswith("Best test accuracy: a tie at 90.00% (medians) between jax/cpu, tensorflow/cpu "
                               "and torch/cpu; next mxnet/cpu 80.00% (n=1): 10.00 points ahead"), best
        assert report.judged_line(order).endswith(
            "jax/cpu 90.00% = tensorflow/cpu 90.00% = torch/cpu 90.00%, mxnet/cpu 80.00% "
            "('=': a tie at the precision shown, listed by name).")


def test_a_staged_task_names_the_stage_and_data_of_its_headline_loss(tmp_path):
    records = [r for r in _wide_run() if r["task"] == "tiny-gpt"]
    best, _ = report.headline(records)
    assert best.startswith("Lowest held-out loss (stage finetune, on licenses): ")
    write_run(tmp_path, records)
    report.write_report(tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "**Lowest held-out loss (stage finetune, on licenses)" in md
    assert "stages pretrain on fortunes, finetune on licenses" in md


OVERFLOW_CHECK = """<div id="sentinel" style="display:none;width:2000px">sentinel</div>
<script>window.addEventListener("load", function () {
  document.querySelectorAll("details").forEach(function (d) { d.open = true; });
  var view = document.documentElement.clientWidth, wide = [];
  document.querySelectorAll("body *").forEach(function (el) {
    var box = el.getBoundingClientRect();
    if (el.id !== "sentinel" && (box.right > view + 0.5 || box.left < -0.5)) {
      wide.push(el.tagName + ":" + Math.round(box.left) + "-" + Math.round(box.right));
    }
  });
  var scroll = document.documentElement.scrollWidth;
  var sentinel = document.getElementById("sentinel");
  sentinel.style.display = "block";
  var caught = sentinel.getBoundingClientRect().right > view;
  var pre = document.createElement("pre");
  pre.id = "overflow";
  pre.textContent = "inner=" + window.innerWidth + " view=" + view + " scroll=" + scroll +
    " sentinel=" + (caught ? "caught" : "missed") + " wide=" + wide.slice(0, 8).join(",");
  document.body.appendChild(pre);
});</script></body>"""


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"Chromium not installed at {CHROMIUM} (Debian: apt install chromium)")
def test_the_page_fits_a_1280_pixel_window_in_headless_chromium(tmp_path):
    run_dir = write_run(tmp_path / "run", _wide_run())
    report.write_report(run_dir)
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    # Every element's box, details opened, at a 1,280 px window; a hidden 2,000 px sentinel shown
    # last proves the measurement can see an overflow.
    out = _dump_dom(page.replace("</body>", OVERFLOW_CHECK), tmp_path, "--hide-scrollbars", "--window-size=1280,900")
    found = re.search(r'<pre id="overflow">(.*?)</pre>', out.stdout)
    assert found, f"no result in the DOM; chromium rc={out.returncode}, stderr tail: {out.stderr[-800:]}"
    result = dict(part.split("=", 1) for part in found.group(1).split(" ", 4))
    assert result["inner"] == "1280" and result["sentinel"] == "caught", result
    assert result["wide"] == "" and int(result["scroll"]) <= int(result["view"]), result


def test_plots_show_plain_ticks_flat_one_epoch_curves_and_titles_clear_of_each_other(kept_figures):
    import io

    from harness import plots

    # One epoch, three backends equal to 1e-7: autoscaling alone would label the axis "1e-7+8.3075e-1".
    records = [make_record("mnist-mlp", b, epochs=1, accuracy=0.830750 + 1e-7 * i) for i, b in enumerate(BACKENDS)]
    plots.plot_epoch_curves(records, io.BytesIO())
    fig = kept_figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes:
        assert ax.yaxis.get_offset_text().get_text() == "", ax.get_title()
        assert not title.overlaps(ax.title.get_window_extent(renderer)), ax.get_title()
        low, high = ax.get_ylim()
        assert high - low > 1e-3 * abs(high), (ax.get_title(), low, high)  # flat drawn flat, not stretched


def test_each_stage_of_a_staged_task_is_drawn_from_its_own_start_on_its_own_data(kept_figures):
    import io

    from harness import plots

    records = [r for r in _wide_run() if r["task"] == "tiny-gpt" and r["repeat"] == 0]
    for r in records:
        m = r["metrics"]
        pretrain = {k: m[k] for k in ("initial_test_loss", "epoch_test_loss", "epoch_train_loss",
                                      "epoch_train_time_s", "test_loss", "test_accuracy")}
        finetune = dict(pretrain, initial_test_loss=3.25, epoch_test_loss=[2.0, 1.8, 1.7], test_loss=1.7)
        m["stages"] = {"pretrain": pretrain, "finetune": finetune}
    plots.plot_epoch_curves(records, io.BytesIO())
    titles = [ax.get_title() for ax in kept_figures[0].axes]
    assert any(t.startswith("tiny-gpt, stage pretrain: held-out loss\nreal fortunes") for t in titles), titles
    judged = next(ax for ax in kept_figures[0].axes
                  if ax.get_title().startswith("tiny-gpt, stage finetune: held-out loss\nreal licenses"))
    curves = [line.get_ydata() for line in judged.get_lines() if not line.get_label().startswith("target")]
    # The finetune curve starts at the finetune stage's own untrained loss, not the pretrain stage's epoch 0.
    assert curves and all(list(y) == [3.25, 2.0, 1.8, 1.7] for y in curves)
    plots.plot_accuracy_vs_time(records, io.BytesIO())
    (panel,) = [ax for ax in kept_figures[1].axes if ax.get_visible()]
    assert panel.get_title().startswith("tiny-gpt, stage finetune\nreal licenses")


def test_list_states_a_loss_target_for_language_models(capsys):
    from harness.cli import main

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not [ln for ln in lines if ln.rstrip().endswith(":") and "target" in ln]
    gpt = lines[lines.index(next(ln for ln in lines if ln.startswith("  tiny-gpt-finetune:"))) + 1]
    assert "held-out loss target 1.6 nats (stage finetune, on licenses)" in gpt
    mlp = lines[lines.index(next(ln for ln in lines if ln.startswith("  mnist-mlp:"))) + 1]
    assert "test-accuracy target, data in order: mnist 0.97" in mlp


def test_a_loss_judged_headline_leads_with_the_lowest_loss_and_the_gap_in_nats():
    assert report.headline(_loss_run())[0] == (
        "Lowest held-out loss: jax/cpu 1.5000 [1.5000\u20131.5000]; next torch/cpu 1.9000 [1.7000\u20132.0000]: "
        "0.4000 nats lower (21.1%), beyond noise (the spreads do not overlap).")


def test_stage_data_names_a_stages_corpus_or_its_classes():
    record = make_record("finetune", "torch", synthetic=True)
    record["spec"].update(primary_stage="finetune", stages=[{"name": "pretrain", "classes": [0, 1, 2, 3, 4]},
                                                            {"name": "finetune", "classes": [5, 7]},
                                                            {"name": "chat", "data": "licenses"}])
    assert stats.stage_data(record, "pretrain") == "classes 0\u20134 of cifar10"
    assert stats.stage_data(record, "finetune") == "classes 5, 7 of cifar10"
    assert stats.stage_data(record, "chat") == "licenses [SYNTHETIC stand-in]"
    assert stats.stage_data(record, "chat", mark_synthetic=False) == "licenses"
    assert report.judged_on([record]) == "stage finetune, on classes 5, 7 of cifar10"
