"""Regression check tests: thresholds, the spread rule, unmatched cells, exit codes."""

from __future__ import annotations

import json

import pytest
from record_factory import make_record, make_run, write_run

from harness.compare import Incomparable, compare_records, compare_runs, parse_threshold, parse_thresholds


def _run(tmp_path, name, records):
    return write_run(tmp_path / name, records)


def _scale(records, figure, factor, *, section="metrics"):
    for r in records:
        r[section][figure] *= factor
    return records


def test_identical_runs_pass(tmp_path):
    records = make_run(backends=("torch", "jax"), repeats=3, jitter=0.05)
    text, code = compare_runs(_run(tmp_path, "a", records), _run(tmp_path, "b", records))
    assert code == 0, text
    assert "RESULT: no regression" in text and "REGRESSION" not in text
    assert "1.000" in text


def test_throughput_drop_is_a_regression_naming_the_rule(tmp_path):
    base = make_run(backends=("torch",), repeats=3, jitter=0.02)
    new = _scale(make_run(backends=("torch",), repeats=3, jitter=0.02), "train_samples_per_s", 0.7)
    text, code = compare_runs(_run(tmp_path, "a", base), _run(tmp_path, "b", new), threshold=0.05)
    assert code == 1
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("train_samples_per_s"))
    assert "REGRESSION" in line and "-30.0%" in line and "relative change" in line
    assert "outside both runs' spread" in line
    assert "torch/cpu: train_samples_per_s" in text.splitlines()[-1]


def test_single_repeat_regression_says_threshold_alone(tmp_path):
    new = _scale(make_run(backends=("torch",)), "peak_rss_mb", 1.5, section="memory")
    text, code = compare_records(make_run(backends=("torch",)), new)
    assert code == 1 and "no spread with n=1, threshold alone" in text


def test_change_beyond_threshold_but_inside_spread_is_noise():
    # Base repeats spread widely (+-20%); the new median is 8% lower but inside that range.
    base = [make_record(repeat=i, throughput=t) for i, t in enumerate((16000, 20000, 24000))]
    new = [make_record(repeat=i, throughput=t) for i, t in enumerate((18000, 18400, 18800))]
    text, code = compare_records(base, new, threshold=0.05)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("train_samples_per_s"))
    assert code == 0, text
    assert "noise" in line and "inside the base spread" in line and "-8.0%" in line


def test_accuracy_uses_absolute_points():
    new = make_run(backends=("torch",), accuracy=0.90)
    text, code = compare_records(make_run(backends=("torch",), accuracy=0.975), new, threshold=0.05)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("test_accuracy"))
    assert code == 1 and "-7.50 points" in line and "absolute change in points" in line


def test_a_cell_missing_from_new_is_a_named_regression_and_a_new_cell_is_listed(tmp_path):
    base = make_run(backends=("torch", "jax"))
    new = make_run(backends=("torch", "tensorflow"))
    text, code = compare_runs(_run(tmp_path, "a", base), _run(tmp_path, "b", new))
    assert code == 1
    assert "REGRESSION: cells in base missing from new (rule: every base cell is in new):\n  mnist-mlp/jax/cpu" in text
    assert "Cells only in new (not in base):\n  mnist-mlp/tensorflow/cpu" in text
    assert "mnist-mlp/jax/cpu: missing from new" in text.splitlines()[-1]


def test_cell_failing_in_new_is_a_regression_but_skipped_is_not():
    base = make_run(backends=("torch", "jax"))
    new = [make_record(backend="torch", status="failed"), make_record(backend="jax", status="skipped")]
    text, code = compare_records(base, new)
    assert code == 1 and "REGRESSION (rule: cell ok in base, failed" in text
    assert "no ok repeat in new: skipped" in text and "mnist-mlp/jax/cpu: status" not in text


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("0.05", 0.05), (" 12.5% ", 0.125), ("0.5%", 0.005)])
def test_parse_threshold(text, value):
    assert parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["five", "5", "-5%", "0", "nan", "%", ""])
def test_bad_threshold_raises_a_clear_value_error(text):
    with pytest.raises(ValueError, match="threshold"):
        parse_threshold(text)


def test_missing_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tribench run folder"):
        compare_runs(tmp_path / "nope", tmp_path / "nope2")


@pytest.mark.parametrize("status", [None, "weird"])
def test_a_new_record_without_a_status_is_a_named_regression(status):
    base = make_run(backends=("torch",), repeats=2)
    new = make_run(backends=("torch",), repeats=2)
    if status is None:
        del new[1]["status"]
    else:
        new[1]["status"] = status
    text, code = compare_records(base, new)
    what = "no status" if status is None else "unknown status 'weird'"
    assert code == 1 and f"mnist-mlp/torch/cpu repeat 1 has {what}" in text
    assert f"mnist-mlp/torch/cpu repeat 1: {what}" in text.splitlines()[-1]


def test_a_cell_whose_only_new_record_has_no_status_is_a_regression():
    new = [make_record()]
    del new[0]["status"]
    text, code = compare_records([make_record()], new)
    assert code == 1 and "REGRESSION (rule: cell ok in base" in text


def test_runs_that_differ_in_what_they_measured_are_refused_naming_each_difference():
    base = make_run(backends=("torch", "jax"), epochs=3)
    new = make_run(backends=("torch", "jax"), epochs=1, synthetic=True)
    for r in new:
        r["env"]["framework_version"] += "-new"
        r["env"]["precision"] = "bf16"
    with pytest.raises(Incomparable) as info:
        compare_records(base, new)
    text = "\n".join(info.value.lines)
    assert "spec.epochs: base 3, new 1 (mnist-mlp/jax, mnist-mlp/torch)" in text
    assert "dataset: base real mnist, new SYNTHETIC mnist" in text
    assert "sizes: base 60000 train / 10000 test, new 2048 train / 512 test" in text
    assert "precision: base fp32, new bf16" in text
    assert "framework version: base torch 2.3.1, new torch 2.3.1-new (mnist-mlp/torch)" in text


def test_a_cpu_run_against_a_gpu_run_is_refused_though_no_cell_matches_by_device():
    with pytest.raises(Incomparable, match="not comparable") as info:
        compare_records(make_run(backends=("torch",)), make_run(backends=("torch",), device="gpu"))
    assert any(line.startswith("device: base cpu, new gpu (NVIDIA H100") for line in info.value.lines)


def test_force_compares_under_a_banner_naming_the_differences():
    base, new = make_run(backends=("torch",), epochs=3), make_run(backends=("torch",), epochs=2)
    text, code = compare_records(base, new, force=True)
    assert text.splitlines()[1].startswith("NOT COMPARABLE, compared anyway (--force)")
    assert "  - spec.epochs: base 3, new 2 (mnist-mlp/torch)" in text


def test_per_figure_thresholds_apply_to_their_figure_only():
    thresholds = parse_thresholds("train_samples_per_s=40%,test_accuracy=0.5pt")
    assert thresholds == {"*": 0.05, "train_samples_per_s": 0.40, "test_accuracy": pytest.approx(0.005)}
    new = _scale(make_run(backends=("torch",)), "train_samples_per_s", 0.7)
    new = _scale(new, "eval_samples_per_s", 0.7)
    for r in new:
        r["metrics"]["test_accuracy"] -= 0.01
    text, code = compare_records(make_run(backends=("torch",)), new, threshold=thresholds)
    line = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ") and "(" in ln}
    assert "ok: within threshold" in line["train_samples_per_s"]
    assert "REGRESSION" in line["eval_samples_per_s"] and "REGRESSION" in line["test_accuracy"]
    assert "-1.00 points vs 0.5-point threshold" in line["test_accuracy"]


@pytest.mark.parametrize("text", ["foo=5%", "train_samples_per_s=1pt", "test_accuracy=abc"])
def test_bad_per_figure_thresholds_are_refused(text):
    with pytest.raises(ValueError, match="threshold"):
        parse_thresholds(text)


def test_json_and_markdown_say_the_same_as_the_text():
    base = make_run(backends=("torch",))
    new = _scale(make_run(backends=("torch",)), "train_samples_per_s", 0.7)
    out, code = compare_records(base, new, fmt="json")
    doc = json.loads(out)
    assert code == 1 and doc["comparable"] is True
    assert doc["regressions"] == ["mnist-mlp/torch/cpu: train_samples_per_s"]
    fig = next(f for f in doc["cells"][0]["figures"] if f["figure"] == "train_samples_per_s")
    assert fig["regression"] is True and fig["new"]["median"] == pytest.approx(0.7 * fig["base"]["median"])
    md, code = compare_records(base, new, fmt="markdown")
    assert code == 1 and "| train_samples_per_s (higher better) |" in md and "**RESULT: 1 regression(s)" in md


def test_cli_refuses_incomparable_runs_with_exit_2_and_forces_with_a_banner(tmp_path, capsys):
    from harness.cli import main

    a = _run(tmp_path, "a", make_run(backends=("torch",), epochs=3))
    b = _run(tmp_path, "b", make_run(backends=("torch",), epochs=1))
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tribench: error: the runs are not comparable") and "spec.epochs: base 3, new 1" in err
    assert main(["compare", str(a), str(b), "--force", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["differences"] == ["spec.epochs: base 3, new 1 (mnist-mlp/torch)"]
    assert main(["compare", str(a), str(b), "--format", "yaml"]) == 2


def test_held_out_loss_is_compared_lower_is_better_for_loss_judged_tasks():
    base = make_run(tasks=("tiny-gpt",), backends=("torch",), repeats=3, test_loss=1.50)
    worse = make_run(tasks=("tiny-gpt",), backends=("torch",), repeats=3, test_loss=1.80)
    text, code = compare_records(base, worse, threshold=0.05)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("test_loss"))
    assert code == 1 and "test_loss (lower better)" in line and "REGRESSION" in line and "+20.0%" in line
    assert "tiny-gpt/torch/cpu: test_loss" in text.splitlines()[-1] and "test_loss 5%" in text
    text, code = compare_records(worse, base, threshold=0.05)
    assert code == 0 and "improved" in next(ln for ln in text.splitlines() if ln.strip().startswith("test_loss"))
    assert parse_thresholds("test_loss=2%")["test_loss"] == pytest.approx(0.02)
    # Accuracy-judged cells do not compare their loss (it is not what they are judged by).
    text, _ = compare_records(make_run(backends=("torch",)), make_run(backends=("torch",)))
    assert "test_loss" not in text


def _best(record, execution):
    record["env"].update(mode_requested="best", execution=execution, mode=execution.split()[-1])
    return record


def test_best_mode_runs_that_chose_other_programs_compare_and_say_so():
    base = [_best(make_record(), "torch eager"), _best(make_record(backend="jax"), "jax.jit step")]
    new = [_best(make_record(), "torch.compile(forward+backward)"), _best(make_record(backend="jax"), "jax.jit step")]
    text, code = compare_records(base, new)
    assert code == 0
    assert "mnist-mlp/torch: base chose torch eager, new chose torch.compile(forward+backward)" in text
    assert "mnist-mlp/jax: base chose" not in text
    assert "torch.compile(forward+backward)" in text.split("== mnist-mlp/torch/cpu ==")[1]  # each side's program
    # Forced modes that ran other programs measured other things: not comparable.
    for r in base + new:
        r["env"]["mode_requested"] = "compiled"
    with pytest.raises(Incomparable) as info:
        compare_records(base, new)
    assert any(line.startswith("execution: base torch eager") for line in info.value.lines)


def test_runs_of_other_task_sets_are_not_comparable(tmp_path, capsys):
    from harness.cli import main

    base = [make_record(), make_record(task="cifar-cnn")]
    with pytest.raises(Incomparable) as info:
        compare_records(base, [make_record()])
    assert info.value.lines == ["tasks: base cifar-cnn, mnist-mlp, new mnist-mlp (the whole run)"]
    assert main(["compare", str(_run(tmp_path, "a", base)), str(_run(tmp_path, "b", [make_record()]))]) == 2
