"""Property-based tests: adversarial records, run.json files and task files into every reader.

Each reader must answer with exit 2 or a warning, on one line, without a traceback, write
nothing outside its folder, and never hang (a hard timeout per example besides
hypothesis's deadline). Examples are few and derandomised so CI stays within a minute.
"""

import contextlib
import copy
import io
import json
import logging
import signal
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from record_factory import make_record

from harness.cli import main
from harness.confine import UntrustedInput
from harness.errors import UsageError
from harness.results import RECORDS_FILE, read_records
from harness.run_config import RunConfig, load_resume, write_run_file
from harness.schema import record_problem
from tasks.taskfile import TaskFileError, load_task_file, spec_from_dict

PER_EXAMPLE_S = 20


def examples(n: int, seconds: float = 5):
    return settings(max_examples=n, deadline=timedelta(seconds=seconds), derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def hard_timeout(seconds: float = PER_EXAMPLE_S):
    """Fail an example that hangs (a FIFO read, a quadratic loop) instead of waiting on it forever."""
    def expire(signum, frame):
        raise TimeoutError(f"example still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Lines(logging.Handler):
    """Every log message, to check each warning is one line."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def watched():
    """(stderr text, log messages) of the block, with the block under a hard timeout."""
    err, lines = io.StringIO(), Lines()
    logging.getLogger().addHandler(lines)
    try:
        with hard_timeout(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            yield err, lines.messages
    finally:
        logging.getLogger().removeHandler(lines)


def snapshot(root: Path, *, skip: tuple[Path, ...]) -> dict:
    """Every file under `root` but those under `skip`, with its size: what a reader must not change."""
    return {p: p.stat().st_size for p in root.rglob("*")
            if p.is_file() and not any(p.is_relative_to(s) for s in skip)}


# No subnormal floats: torch's configure flushes them on every thread of this process (an earlier
# test may have run it), and hypothesis refuses to draw them there; every other float stays in.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_subnormal=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12)
RECORD_FIELDS = ["task", "backend", "repeat", "seed", "status", "error", "failure", "data", "metrics", "memory",
                 "env", "spec", "started_at", "finished_at", "schema_version"]
METRICS = ["test_accuracy", "test_loss", "train_samples_per_s", "time_to_target_s", "epoch_test_accuracy",
           "eval_every_epochs", "warmup_s", "initial_test_accuracy"]


@st.composite
def records(draw):
    """A realistic record with one field, or one figure, replaced by arbitrary JSON."""
    record = make_record(backend=draw(st.sampled_from(["torch", "jax"])), repeat=draw(st.integers(0, 2)))
    where = draw(st.sampled_from(["field", "metric", "none"]))
    if where == "field":
        record[draw(st.sampled_from(RECORD_FIELDS))] = draw(JSON)
    elif where == "metric":
        record["metrics"][draw(st.sampled_from(METRICS))] = draw(JSON)
    return record


LINES = st.one_of(records().map(json.dumps), JSON.map(json.dumps), st.text(max_size=40).map(lambda t: t.replace(
    "\n", " ")))


@examples(60)
@given(lines=st.lists(LINES, min_size=1, max_size=6))
def test_read_records_keeps_only_valid_records_and_warns_on_one_line(lines):
    with tempfile.TemporaryDirectory() as tmp, watched() as (_, messages):
        path = Path(tmp) / RECORDS_FILE
        path.write_text("\n".join(lines) + "\n")
        kept = read_records(path, history=True)
    assert all(record_problem(r) is None for r in kept)
    assert len(messages) == len([ln for ln in lines if ln.strip()]) - len(kept)
    assert all("\n" not in m and f"{path}:" in m for m in messages)


def run_folder(root: Path, recs: list[dict]) -> Path:
    run = root / "run"
    run.mkdir()
    (run / RECORDS_FILE).write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in recs))
    return run


def check_reader(args_of, recs: list[dict], *, codes=(0, 1, 2, 3)) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bystander.txt").write_text("untouched")
        run = run_folder(root, [make_record(), *recs])
        before = snapshot(root, skip=(run, root / "tb"))
        with watched() as (err, messages):
            code = main(args_of(root, run))
        assert code in codes, err.getvalue()
        assert "Traceback" not in err.getvalue() and len(err.getvalue().strip().splitlines()) <= 1, err.getvalue()
        assert all("\n" not in m for m in messages)
        assert snapshot(root, skip=(run, root / "tb")) == before


@examples(6, seconds=15)
@given(recs=st.lists(records(), min_size=1, max_size=3))
def test_compare_history_and_tensorboard_export_take_any_records(recs):
    pytest.importorskip("tensorboard")
    check_reader(lambda root, run: ["compare", str(run), str(run)], recs)
    check_reader(lambda root, run: ["history", str(run)], recs, codes=(0, 2))
    check_reader(lambda root, run: ["export", str(run), "--tensorboard", str(root / "tb")], recs, codes=(0, 2))


@examples(5, seconds=30)
@given(recs=st.lists(records(), min_size=1, max_size=2))
def test_report_takes_any_records(recs):
    check_reader(lambda root, run: ["report", str(run)], recs, codes=(0,))


def saved_run(root: Path) -> Path:
    out = root / "run"
    out.mkdir()
    write_run_file(RunConfig(tasks=["mnist-mlp"], backends=["torch"], out=out, data="synthetic", quick=True,
                             threads=1))
    return out


@st.composite
def run_files(draw):
    """A real run.json with one value, at the top or in its config, replaced by arbitrary JSON, or arbitrary JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        saved = json.loads((saved_run(Path(tmp)) / "run.json").read_text())
    where = draw(st.sampled_from(["top", "config", "whole"]))
    if where == "whole":
        return draw(JSON)
    table = saved if where == "top" else saved["config"]
    table[draw(st.sampled_from(sorted(table) + ["unknown"]))] = draw(JSON)
    return saved


@examples(40)
@given(saved=run_files())
def test_resume_reads_any_run_json_with_one_line_or_not_at_all(saved):
    with tempfile.TemporaryDirectory() as tmp:
        out = saved_run(Path(tmp))
        (out / "run.json").write_text(json.dumps(saved, allow_nan=True))
        before = snapshot(Path(tmp), skip=())
        with watched():
            try:
                cfg = load_resume(out)
            except (UsageError, UntrustedInput) as exc:
                assert "\n" not in str(exc)
            else:
                assert isinstance(cfg, RunConfig)
        assert snapshot(Path(tmp), skip=()) == before


@examples(60)
@given(cut=st.integers(0, 400), insert=st.text(alphabet="[]{}=\"',.#\n abc019-_\\", max_size=20))
def test_any_task_file_gives_a_spec_or_one_line(cut, insert):
    from test_taskfile import GOOD

    text = GOOD
    text = text[:cut] + insert + text[cut:]
    with tempfile.TemporaryDirectory() as tmp, watched():
        path = Path(tmp) / "t.toml"
        path.write_text(text)
        try:
            load_task_file(path)
        except TaskFileError as exc:
            assert "\n" not in str(exc)


@st.composite
def spec_tables(draw):
    from tasks import get_task

    table = copy.deepcopy(json.loads(json.dumps(get_task(draw(st.sampled_from(["mnist-mlp", "cifar-cnn"])))
                                                .to_dict())))
    where = draw(st.sampled_from(["top", "layer", "optimizer"]))
    if where == "top":
        table[draw(st.sampled_from(sorted(table)))] = draw(JSON)
    elif where == "layer":
        layer = draw(st.sampled_from(table["layers"]))
        layer[draw(st.sampled_from(sorted(layer)))] = draw(JSON)
    else:
        table["optimizer"][draw(st.sampled_from(sorted(table["optimizer"])))] = draw(JSON)
    return table


@examples(60)
@given(table=spec_tables())
def test_any_spec_table_gives_a_spec_or_a_task_file_error(table):
    with hard_timeout():
        try:
            spec_from_dict(table)
        except TaskFileError:
            pass
