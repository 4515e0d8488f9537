"""Report tests: tables, parity and environment, PNG plots, a self-contained HTML that loads in Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from record_factory import make_record, make_run, write_run

from harness import report, stats
from harness.stats import format_stat, summarise

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


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"Chromium not installed at {CHROMIUM} (Debian: apt install chromium)")
def test_every_image_loads_in_headless_chromium(full_run, tmp_path):
    run_dir, _ = full_run
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    # The check runs on a copy: the report itself carries no script. A deliberately broken
    # sentinel image proves the check can fail.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", IMG_CHECK), encoding="utf-8")
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
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
