"""Task files: the examples load, specs round-trip through dicts, and every malformed file is one clear line."""

import json
from pathlib import Path

import pytest

from harness.cli import main
from tasks import TASKS
from tasks.taskfile import TaskFileError, load_task_file, spec_from_dict

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "tasks").glob("*.toml"))

GOOD = """
name = "tiny"
dataset = "mnist"
input_shape = [28, 28, 1]
batch_size = 32
epochs = 1
target_accuracy = 0.5

[optimizer]
kind = "sgd"
lr = 0.1
momentum = 0.9

[[layers]]
kind = "flatten"
name = "flatten"

[[layers]]
kind = "residual"
name = "block"

  [[layers.body]]
  kind = "dense"
  name = "inner"
  units = 784

[[layers]]
kind = "dense"
name = "head"
units = 10
"""


def write(tmp_path, text, name="task.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_examples_load_and_cover_the_kinds_they_promise():
    assert len(EXAMPLES) == 3
    kinds = {p.stem: {layer.kind for layer, _, _ in load_task_file(p).walk()} for p in EXAMPLES}
    assert {"residual", "batchnorm", "conv2d"} <= kinds["cifar-resnet-bn"]
    assert {"layernorm", "dropout"} <= kinds["mnist-mlp-ln"]
    assert {"embedding", "positionalembedding", "multiheadselfattention", "layernorm"} <= kinds["fortunes-gpt"]
    mlp = next(p for p in EXAMPLES if p.stem == "mnist-mlp-ln")
    assert any(layer.activation == "gelu" for layer, _, _ in load_task_file(mlp).walk()
               if hasattr(layer, "activation"))


def test_the_example_language_model_is_tiny_gpts_architecture_on_text():
    from tasks.tiny_gpt import gpt_layers

    spec = load_task_file(next(p for p in EXAMPLES if p.stem == "fortunes-gpt"))
    assert spec.layers == gpt_layers(d_model=64, layers=2, heads=2, context=64)
    assert spec.dataset == "fortunes" and spec.input_shape == (64,) and spec.num_classes == 256
    assert spec.objective == "loss" and spec.takes_tokens and spec.any_length


IMAGE_MLP = GOOD[:GOOD.index("[[layers]]")] + """
[[layers]]
kind = "flatten"
name = "flatten"

[[layers]]
kind = "dense"
name = "head"
units = 10
"""

LANGUAGE_MODEL = """
name = "tiny-lm"
dataset = "text"
input_shape = [16]
num_classes = 256
batch_size = 8
epochs = 1
target_accuracy = 0.5

[optimizer]
kind = "adam"
lr = 1e-3

[[layers]]
kind = "embedding"
name = "emb"
vocab_size = 256
dim = 8

[[layers]]
kind = "dense"
name = "head"
units = 256
"""


@pytest.mark.parametrize("dataset, shape", [("fashion-mnist", "[28, 28, 1]"), ("cifar10", "[32, 32, 3]"),
                                            ("text", "[16]"), ("tiny-shakespeare", "[16]")])
def test_a_task_file_may_name_any_dataset_of_the_table(tmp_path, dataset, shape):
    base = LANGUAGE_MODEL if shape == "[16]" else IMAGE_MLP  # text: token ids in, a byte's logits at every position out
    text = base.replace('dataset = "text"', 'dataset = "mnist"').replace('dataset = "mnist"', f'dataset = "{dataset}"')
    spec = load_task_file(write(tmp_path, text.replace("[28, 28, 1]", shape)))
    assert spec.dataset == dataset and spec.input_shape == tuple(json.loads(shape))


@pytest.mark.parametrize("dataset, shape, words", [
    ("imagenet", "[28, 28, 1]", ["'imagenet' is no dataset here", "fashion-mnist", "fortunes"]),
    ("fashion-mnist", "[32, 32, 3]", ["(28, 28, 1) images, not input_shape (32, 32, 3)"]),
    ("fortunes", "[28, 28, 1]", ["'fortunes' is text", "one axis"]),
])
def test_a_dataset_the_input_does_not_fit_is_one_line_naming_the_field(tmp_path, capsys, dataset, shape, words):
    text = IMAGE_MLP.replace('dataset = "mnist"', f'dataset = "{dataset}"')
    path = write(tmp_path, text.replace("[28, 28, 1]", shape))
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "field 'dataset'" in err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("spec", [*TASKS.values(), *map(load_task_file, EXAMPLES)], ids=lambda s: s.name)
def test_specs_round_trip_through_json(spec):
    # What a record or a checkpoint stores reads back as the same spec: report, compare and
    # workers rely on it.
    assert spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_a_small_file_builds_with_a_nested_residual_body(tmp_path):
    spec = load_task_file(write(tmp_path, GOOD))
    assert [layer.name for layer, _, _ in spec.walk()] == ["flatten", "block", "inner", "head"]
    assert spec.optimizer.kind == "sgd" and spec.optimizer.momentum == 0.9
    assert [e.name for e in spec.params()] == ["inner.kernel", "inner.bias", "head.kernel", "head.bias"]


@pytest.mark.parametrize("change, words", [
    (("units = 784", "unitz = 784"), ["layer layers[1].body[0] ('inner')", "unknown field 'unitz'"]),
    (('kind = "dense"\n  name = "inner"', 'kind = "densse"\n  name = "inner"'), ["body[0]", "unknown kind 'densse'"]),
    (("units = 784", 'units = "784"'), ["'inner'", "field 'units' must be int"]),
    (("units = 784", "units = 100"), ["'block'", "the body maps (784,) to (100,)"]),
    (("momentum = 0.9", "momentun = 0.9"), ["optimizer", "unknown field 'momentun'"]),
    (("epochs = 1", "epochs = 1\nepoch = 2"), ["unknown field 'epoch'"]),
    (("epochs = 1", ""), ["missing field 'epochs'"]),
    (("[optimizer]", "[optimizer"), ["TOML syntax"]),
    (('name = "head"\nunits = 10', 'name = "head"\nunits = 10\nactivation = "softmax"'),
     ["'head'", "unknown activation 'softmax'"]),
])
def test_malformed_files_exit_2_with_one_line_naming_file_layer_and_field(tmp_path, capsys, change, words):
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(TaskFileError):
        load_task_file(path)
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "Traceback" not in err
    for word in words:
        assert word in err


def test_show_prints_the_layer_table_with_totals(capsys):
    assert main(["show", str(EXAMPLES[0])]) == 0
    out = capsys.readouterr().out
    assert "block1_conv1" in out and "globalavgpool2d" in out and "(16, 16, 32)" in out
    assert "total: 28,842 trainable parameters, 288 state" in out
    assert main(["show", "cifar-cnn"]) == 0 and "122,570 trainable parameters" in capsys.readouterr().out
    assert main(["show", "no-such-task"]) == 2


def test_run_refuses_a_dataset_the_input_shape_does_not_fit(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace('dataset = "mnist"', 'dataset = "cifar10"'))
    assert main(["run", "--task", str(path), "--data", "synthetic", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "field 'dataset'" in err and str(path) in err


def test_records_written_before_spec_v2_read_back_as_the_same_tasks():
    from tasks import get_task

    path = Path(__file__).parent.parent / "results" / "reference-cpu" / "records.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert records
    for record in records:
        spec = spec_from_dict(record["spec"])
        assert spec.layers == get_task(record["task"]).layers and spec.optimizer == get_task(record["task"]).optimizer


def test_resume_of_a_file_task_needs_no_file(tmp_path):
    """run.json keeps a file task's spec; --resume registers it even after the file is gone."""
    from harness.run_config import RunConfig, load_resume, write_run_file
    from tasks import load_task

    source = tmp_path / "mine.toml"
    source.write_text((Path(__file__).parents[1] / "examples/tasks/mnist-mlp-ln.toml").read_text())
    spec = load_task(str(source))
    out = tmp_path / "run"
    out.mkdir()
    write_run_file(RunConfig(tasks=[spec.name], backends=["jax"], out=out, data="synthetic", quick=True))
    source.unlink()
    del TASKS[spec.name]  # as in a new process
    cfg = load_resume(out)
    assert cfg.tasks == [spec.name] and TASKS[spec.name] == spec


# GOOD's model with its Flatten and residual block swapped for a reshape to rows and attention.
TRANSFORMER_WITHOUT_FLATTEN = GOOD[:GOOD.index("[[layers]]")] + """
[[layers]]
kind = "reshape"
name = "rows"
target_shape = [28, 28]

[[layers]]
kind = "multiheadselfattention"
name = "attn"
heads = 4

[[layers]]
kind = "dense"
name = "head"
units = 10
"""


def test_show_refuses_a_head_whose_output_does_not_fit_the_labels(tmp_path, capsys):
    # A transformer over image rows without a Flatten: its head gives (28, 10) logits per image.
    path = write(tmp_path, TRANSFORMER_WITHOUT_FLATTEN)
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(28, 10)" in err and "(10,)" in err and "Flatten" in err
    fixed = TRANSFORMER_WITHOUT_FLATTEN.replace('[[layers]]\nkind = "dense"\nname = "head"',
                                                '[[layers]]\nkind = "flatten"\nname = "f"\n\n'
                                                '[[layers]]\nkind = "dense"\nname = "head"'
                                                ).replace('name = "tiny"', 'name = "tiny-fixed"')
    assert main(["show", str(write(tmp_path, fixed, "fixed.toml"))]) == 0


def test_heads_that_do_not_split_the_width_are_refused_in_a_file_as_by_override(tmp_path, capsys):
    path = write(tmp_path, TRANSFORMER_WITHOUT_FLATTEN.replace("heads = 4", "heads = 5"))
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a multiple of heads 5" in err
    assert err.count("'attn'") == 1  # the layer is named once, by the file's reader
    out = tmp_path / "out"
    assert main(["run", "--task", "tiny-gpt", "--override", "d_model=64,heads=5", "--data", "synthetic",
                 "--out", str(out)]) == 2
    assert "not a multiple of heads 5" in capsys.readouterr().err
