"""The figures registry is the one table every reader iterates: a new entry reaches each of them."""

from __future__ import annotations

from record_factory import make_record

from harness import compare, export_common, figures, history, report


def test_registry_names_are_unique_and_rules_known():
    names = [f.name for f in figures.FIGURES]
    assert len(names) == len(set(names))
    assert {f.compare for f in figures.FIGURES} <= {None, "relative", "points"}
    assert {f.report for f in figures.FIGURES} <= {None, "core", "extra"}
    assert all(f.higher_is_better is not None for f in figures.FIGURES if f.compare)


def test_a_new_registry_entry_reaches_report_compare_history_and_exports(monkeypatch):
    new = figures.Figure("widgets_per_s", "widgets/s", ",.0f", "widgets/s", True, "relative", exported=True,
                         series="epoch_widgets", report="core", terminal=True, history="widgets/s")
    monkeypatch.setattr(figures, "FIGURES", (*figures.FIGURES, new))
    monkeypatch.setattr(figures, "BY_NAME", {**figures.BY_NAME, new.name: new})
    record = make_record("mnist-mlp", "torch", 0, epochs=2)
    record["metrics"].update(widgets_per_s=1234.0, epoch_widgets=[1.0, 2.0])
    assert export_common.scalars(record)["widgets_per_s"] == 1234.0
    assert export_common.epoch_series(record)["widgets_per_s"] == [(1, 1.0), (2, 2.0)]
    assert "widgets_per_s" in compare.parse_thresholds("widgets_per_s=3%")
    text, _ = compare.compare_records([record], [record])
    assert "widgets_per_s (higher better)" in text
    series = {("machine", "mnist-mlp", "torch", "variant"): {"commit": [record]}}
    assert ("widgets_per_s", "widgets/s", ",.0f") in history.figures(series, set())
    table = report.summary_table([record])
    assert table["widgets/s"].iloc[0].startswith("1,234")
    assert "widgets/s" in report.render_terminal([record])


def test_compare_calls_a_slower_batch1_latency_a_regression_and_a_faster_one_an_improvement():
    base = make_record("mnist-mlp", "torch", 0)
    base["metrics"].update(infer_latency_ms_p50=1.0, infer_latency_ms_p99=2.0, infer_samples_per_s=1000.0)
    slower = make_record("mnist-mlp", "torch", 0)
    slower["metrics"].update(infer_latency_ms_p50=1.5, infer_latency_ms_p99=2.0, infer_samples_per_s=1000.0)
    text, code = compare.compare_records([base], [slower])
    assert code == 1 and "mnist-mlp/torch/cpu: infer_latency_ms_p50" in text
    assert "infer_latency_ms_p50 (lower better)" in text
    faster = make_record("mnist-mlp", "torch", 0)
    faster["metrics"].update(infer_latency_ms_p50=0.5, infer_latency_ms_p99=2.0, infer_samples_per_s=1000.0)
    text, _ = compare.compare_records([base], [faster])
    line = next(ln for ln in text.splitlines() if "infer_latency_ms_p50 (lower better)" in ln)
    assert "improved" in line
