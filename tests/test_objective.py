"""The task owns its objective: the spec says it, every record carries it, readers take it from there."""

import json

from record_factory import make_record

from harness.results import read_records
from harness.stats import judged_by_loss
from tasks import get_task


def test_the_spec_names_its_objective():
    assert get_task("tiny-gpt").objective == "loss"
    assert get_task("tiny-gpt-finetune").objective == "loss"
    assert get_task("mnist-mlp").objective == "accuracy"
    assert get_task("mnist-mlp").with_overrides(target_loss=0.3).objective == "loss"


def test_readers_follow_the_records_objective_not_its_figures():
    record = make_record("mnist-mlp", "torch")
    record["metrics"]["bits_per_byte"] = 1.0  # a figure alone decides nothing
    assert not judged_by_loss([record])
    record["objective"] = "loss"
    assert judged_by_loss([record])


def test_a_record_written_before_the_objective_takes_it_from_its_spec(tmp_path):
    old = [make_record("tiny-gpt", "torch"), make_record("mnist-mlp", "torch")]
    for record in old:
        del record["objective"]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert [r["objective"] for r in read_records(tmp_path)] == ["loss", "accuracy"]
