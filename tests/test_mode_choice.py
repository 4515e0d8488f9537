"""--mode best decides once per cell: the first repeat probes, later repeats (and resumed ones) train in its choice;
records keep the machine's load."""

import pytest
from record_factory import make_record
from test_cli import run_cli

from harness import load
from harness.cells import Cell, deciding_first, pinned_modes
from harness.results import read_records


def _best(repeat, mode, *, backend="torch", status="ok"):
    record = make_record(backend=backend, repeat=repeat, status=status, mode=mode)
    record["env"]["mode_requested"] = "best"
    return record


def test_the_first_finished_repeat_of_a_cell_pins_its_mode():
    records = [_best(1, "compiled"), _best(0, "eager"), _best(0, "compiled", backend="jax", status="failed"),
               _best(2, "compiled", backend="jax")]
    forced = make_record(backend="tensorflow", mode="compiled")
    forced["env"]["mode_requested"] = "compiled"
    assert pinned_modes([*records, forced]) == {("mnist-mlp", "torch"): "eager", ("mnist-mlp", "jax"): "compiled"}


def test_each_unpinned_cell_decides_in_its_lowest_repeat_to_run_first():
    cells = [Cell("t", b, r) for r in (1, 2) for b in ("torch", "jax")]  # a resumed run: repeat 0 is done
    deciding, rest = deciding_first(cells, {("t", "torch"): "eager"})
    assert [c.key for c in deciding] == [("t", "jax", 1)]
    assert [c.key for c in rest] == [("t", "torch", 1), ("t", "torch", 2), ("t", "jax", 2)]


def test_load_is_kept_and_a_loaded_cell_is_flagged(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    monkeypatch.setattr(load, "PROC_STAT", stat)
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3\n")
    start = load.snapshot()
    stat.write_text("cpu  150 0 150 850 0 0 0 50 0 0\n")
    summary = load.summary(start, load.snapshot())
    assert summary["cpu_steal"] == 0.25 and len(summary["start"]) == 3
    assert load.under_load({"cpu_count": 2, "load": {**summary, "start": [0.1] * 3, "end": [0.1] * 3}}) \
        == "25% CPU stolen"
    quiet = {"start": [0.5, 0.4, 0.3], "end": [2.0, 1.0, 0.5], "cpu_steal": 0.0}
    assert load.under_load({"cpu_count": 2, "load": quiet}) is None
    busy = {**quiet, "end": [3.5, 2.0, 1.0]}
    assert load.under_load({"cpu_count": 2, "load": busy}) == "load 3.5 on 2 cores"
    stat.write_text("")  # a kernel without the counters: steal unknown, not zero
    assert load.summary(load.snapshot(), load.snapshot())["cpu_steal"] is None


@pytest.mark.slow
def test_repeats_train_in_the_first_repeats_choice_and_two_best_runs_compare(tmp_path, fast_backend):
    args = ("run", "--task", "mnist-mlp", "--backend", fast_backend, "--data", "synthetic", "--quick",
            "--threads", "1", "--repeats", "2")
    cache = {"TRIBENCH_MODE_CACHE": str(tmp_path / "modes")}  # a: probes and keeps its decision; b: reads it
    for name, source in (("a", "probe"), ("b", "cache")):
        out = run_cli(*args, "--out", str(tmp_path / name), env=cache)
        assert out.returncode == 0, out.stderr[-3000:]
        first, second = read_records(tmp_path / name)
        assert first["env"]["mode_source"] == source and first["metrics"]["mode_probe"]["chosen"]
        assert second["env"]["mode_source"] == "pinned" and second["metrics"]["mode_probe"] is None
        assert second["env"]["mode"] == first["env"]["mode"] and second["env"]["execution"] == first["env"]["execution"]
        assert first["env"]["load"]["start"] is not None
    a, b = (read_records(tmp_path / name)[0]["metrics"]["mode_probe"] for name in "ab")
    assert b["cached_at"] and b["probe_s"] == 0 and b["cached_probe_s"] == a["probe_s"] and b["chosen"] == a["chosen"]
    compared = run_cli("compare", str(tmp_path / "a"), str(tmp_path / "b"), "--threshold", "1000%")
    assert compared.returncode == 0, compared.stdout + compared.stderr


def test_every_adapter_names_the_program_of_each_mode():
    from backends import BACKENDS, get_backend
    from backends.base import MODES

    for name in BACKENDS:
        executions = type(get_backend(name)).EXECUTIONS
        assert set(executions) == set(MODES) and len(set(executions.values())) == len(MODES), name


def test_jax_compiled_with_convolutions_on_a_cpu_is_the_eager_program():
    from conftest import INSTALLED, configured

    from tasks import get_task

    if "jax" not in INSTALLED:
        pytest.skip("jax not installed")
    backend = configured("jax")
    if backend.environment()["device"] != "cpu":
        pytest.skip("a CPU rule")
    assert backend.execution(get_task("cifar-cnn"), "compiled") == ("eager", "jax.jit step")
    assert backend.distinct_modes(get_task("cifar-cnn")) == ("eager",)
    assert backend.execution(get_task("mnist-mlp"), "compiled") == ("compiled", "jax lax.scan epoch")
    assert backend.distinct_modes(get_task("mnist-mlp")) == ("compiled", "eager")


def test_the_report_flags_cells_run_under_load():
    from harness.report import render_terminal

    quiet, loaded = make_record(), make_record(backend="jax")
    quiet["env"]["load"] = {"start": [0.2, 0.1, 0.1], "end": [1.9, 0.8, 0.3], "cpu_steal": 0.0}
    loaded["env"]["load"] = {"start": [6.0, 5.0, 4.0], "end": [7.5, 5.5, 4.2], "cpu_steal": None}
    text = render_terminal([quiet, loaded])
    assert "UNDER LOAD: jax r0 (load 7.5 on 2 cores)" in text and "torch r0" not in text
