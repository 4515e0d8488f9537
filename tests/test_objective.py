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


def test_stage_figures_follow_the_spec_not_stage_names():
    from tasks.taskfile import spec_from_dict

    table = get_task("finetune").to_dict()
    renamed = {"pretrain": "source", "finetune": "transfer", "scratch": "fresh"}
    for stage in table["stages"]:
        stage["name"] = renamed[stage["name"]]
        if stage["init"] in renamed:
            stage["init"] = renamed[stage["init"]]
        if stage.get("control_for"):
            stage["control_for"] = renamed[stage["control_for"]]
    table["primary_stage"] = "transfer"
    spec = spec_from_dict(table)
    stages = {"source": {"test_accuracy": 0.5, "train_samples_per_s": 10.0},
              "transfer": {"test_accuracy": 0.9, "train_samples_per_s": 30.0},
              "fresh": {"test_accuracy": 0.7, "train_samples_per_s": 20.0}}
    assert spec.stage_figures(stages) == {"finetuned_accuracy": 0.9, "scratch_accuracy": 0.7,
                                          "frozen_train_samples_per_s": 30.0, "full_train_samples_per_s": 20.0}
    without_control = spec_from_dict({**table, "stages": [{**s, "control_for": None} for s in table["stages"]]})
    assert without_control.stage_figures(stages) == {}


def test_a_control_must_name_another_stage():
    import pytest

    from tasks.spec import SpecError, Stage

    with pytest.raises(SpecError, match="control_for must name another stage"):
        get_task("mnist-mlp").with_overrides(stages=(Stage("train", control_for="nowhere"),))
