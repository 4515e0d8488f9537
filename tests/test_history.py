"""History: runs found under a folder, keyed by machine and commit, a table per figure and a trend plot."""

from __future__ import annotations

import test_report
from record_factory import make_run, write_run

from harness import history
from harness.cli import main

kept_figures = test_report.kept_figures  # the plot functions' figures, kept open for inspection


def _at(records, sha, *, dirty=False, hostname="bench-1", when="2024-06-01T12:00:00Z"):
    for r in records:
        r["env"].update(git_commit=sha, git_dirty=dirty, hostname=hostname)
        r["started_at"] = when
    return records


def test_history_follows_each_figure_across_commits_per_machine_with_the_spread(tmp_path):
    root = tmp_path / "results"
    # Two runs at the newer commit pool their repeats; the older commit is found in a nested folder.
    write_run(root / "runs" / "new-a", _at(make_run(backends=("torch",), repeats=2, throughput=30000.0),
                                           "b" * 40, when="2024-06-03T00:00:00Z"))
    write_run(root / "runs" / "new-b", _at(make_run(backends=("torch",), repeats=1, throughput=33000.0),
                                           "b" * 40, when="2024-06-03T01:00:00Z"))
    write_run(root / "old" / "deep", _at(make_run(backends=("torch",), repeats=1, throughput=20000.0),
                                         "a" * 40, dirty=True, when="2024-06-01T00:00:00Z"))
    write_run(root / "other-machine", _at(make_run(backends=("torch",)), "a" * 40, hostname="laptop"))
    series, commits = history.collect(root)
    assert commits == ["aaaaaaaa-dirty", "aaaaaaaa", "bbbbbbbb"]
    keys = [k for k in series if k[0].startswith("bench-1")]
    assert len(keys) == 1 and keys[0][1:3] == ("mnist-mlp", "torch")
    assert sorted(series[keys[0]]) == ["aaaaaaaa-dirty", "bbbbbbbb"] and len(series[keys[0]]["bbbbbbbb"]) == 3
    paths = history.write_history(root, tmp_path / "out")
    text = paths[0].read_text()
    assert "## bench-1:" in text and "## laptop:" in text
    row = next(ln for ln in text.split("### train samples/s")[1].splitlines() if ln.startswith("| mnist-mlp"))
    # The old commit's one run, then the new commit's three repeats as a median with its range.
    assert "20,000 (n=1)" in row and "30,000 [30,000\u201333,000]" in row
    assert row.index("20,000") < row.index("30,000")
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_history_cli_prints_the_tables_and_refuses_a_folder_without_runs(tmp_path, capsys):
    write_run(tmp_path / "r" / "one", _at(make_run(backends=("jax",)), "c" * 40))
    assert main(["history", str(tmp_path / "r"), "--out", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "`cccccccc`" in out and str(tmp_path / "h" / "history.png") in out
    (tmp_path / "empty").mkdir()
    assert main(["history", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no run with an ok record" in err


def test_history_follows_the_test_loss_of_a_task_judged_by_it(tmp_path):
    """tiny-gpt is judged by held-out loss: its rows get a test-loss table; an accuracy-judged task's do not."""
    root = tmp_path / "results"
    write_run(root / "a", _at(make_run(tasks=("tiny-gpt", "mnist-mlp"), backends=("torch",)), "a" * 40,
                              when="2024-06-01T00:00:00Z"))
    write_run(root / "b", _at(make_run(tasks=("tiny-gpt",), backends=("torch",), test_loss=1.25), "b" * 40,
                              when="2024-06-02T00:00:00Z"))
    paths = history.write_history(root, tmp_path / "out")
    table = paths[0].read_text().split("### test loss (lower is better)")[1].split("###")[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")][1:]
    assert len(rows) == 1 and rows[0].startswith("| tiny-gpt | torch")
    assert "1.5000 (n=1)" in rows[0] and "1.2500 (n=1)" in rows[0]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_history_plot_has_one_machine_per_row_distinct_colours_and_the_legend_outside(tmp_path, kept_figures):
    import io

    kept = kept_figures
    root = tmp_path / "results"
    for host in ("laptop", "gpu-box"):
        for i, sha in enumerate(("a" * 40, "b" * 40)):
            write_run(root / host / sha[:1], _at(make_run(backends=("torch", "jax", "tensorflow")), sha,
                                                 hostname=host, when=f"2024-06-0{i + 1}T00:00:00Z"))
    series, commits = history.collect(root)
    history.plot_trends(series, commits, io.BytesIO())
    fig = kept[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2 * 4  # two machines x one task, a panel per followed figure
    for ax in panels:
        lines = [c for c in ax.containers]
        colours = {tuple(c.lines[0].get_color()) for c in lines}
        assert len(lines) == 3 and len(colours) == 3, ax.get_title()  # a line per backend, each its own colour
        machines = [m for m in ("laptop", "gpu-box") if m in ax.get_title()]
        assert len(machines) == 1, ax.get_title()
    legends = [ax.get_legend() for ax in panels if ax.get_legend()]
    assert len(legends) == 2  # one per machine's row
    for legend in legends:
        box, axes_box = legend.get_window_extent(renderer), legend.axes.get_window_extent(renderer)
        assert box.x0 >= axes_box.x1 and len(legend.get_texts()) == 3  # outside, right of its row


def test_history_writes_where_out_says_and_only_prints_from_the_default_folder(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "results" / "one", _at(make_run(backends=("jax",)), "c" * 40))
    monkeypatch.chdir(tmp_path)
    assert main(["history"]) == 0
    assert "`cccccccc`" in capsys.readouterr().out and not list(tmp_path.rglob("history.*"))
    assert main(["history", "--out", str(tmp_path / "elsewhere")]) == 0
    assert sorted(p.name for p in tmp_path.rglob("history.*")) == ["history.md", "history.png"]
    assert (tmp_path / "elsewhere" / "history.md").exists()
    assert main(["history", "results"]) == 0  # named: written into the folder it reads
    assert (tmp_path / "results" / "history.png").exists()
