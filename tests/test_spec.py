"""Task specs: invalid ones fail when built, valid ones derive the right shapes and counts."""

import dataclasses

import pytest

from tasks import TASKS, get_task
from tasks.spec import Adam, Conv2D, Dense, Flatten, SpecError, Stage, TaskSpec


def mlp(**changes):
    base = dict(name="t", dataset="mnist", input_shape=(28, 28, 1),
                layers=(Flatten(name="flatten"), Dense(units=128, activation="relu", name="fc1"),
                        Dense(units=10, name="head")),
                optimizer=Adam(), batch_size=128, epochs=1, target_accuracy=0.9)
    base.update(changes)
    return TaskSpec(**base)


def test_mnist_mlp_is_the_tutorial_model():
    spec = get_task("mnist-mlp")
    assert [(e.name, e.param.shape) for e in spec.params()] == [
        ("fc1.kernel", (784, 128)), ("fc1.bias", (128,)), ("head.kernel", (128, 10)), ("head.bias", (10,))]
    assert spec.param_count() == 784 * 128 + 128 + 128 * 10 + 10
    assert (spec.optimizer.lr, spec.batch_size, spec.epochs, spec.target_accuracy) == (1e-3, 128, 5, 0.97)


def test_cifar_cnn_shapes_follow_the_tensorflow_tutorial():
    spec = get_task("cifar-cnn")
    assert spec.layer_shapes()[:6] == [(30, 30, 32), (15, 15, 32), (13, 13, 64), (6, 6, 64), (4, 4, 64), (1024,)]
    assert spec.param_count() == 122570  # the tutorial's model.summary() total


def test_finetune_freezes_the_convolutions_and_redraws_the_head():
    spec = get_task("finetune")
    stage = spec.stage("finetune")
    assert set(stage.trainable) == {"fc1", "head"} and stage.reinit == ("head",) and stage.init == "previous"
    assert not ({"conv1", "conv2", "conv3"} & set(stage.trainable))
    assert spec.stage("scratch").trainable is None and spec.stage("scratch").init == "seed"
    assert spec.param_count(stage.trainable) < spec.param_count()


@pytest.mark.parametrize("make, message", [
    (lambda: Dense(units=10, activation="softmax", name="x"), "unknown activation 'softmax'"),
    (lambda: Dense(units=10, activation="sigmoid", name="x"), "unknown activation 'sigmoid'"),
    (lambda: Dense(units=0, name="x"), "units must be a positive int"),
    (lambda: Dense(units=-3, name="x"), "units must be a positive int"),
    (lambda: Conv2D(filters=8, kernel_size=3, padding="full", name="c"), "unknown padding"),
    (lambda: mlp(layers=(Flatten(name="a"), Dense(units=10, name="a"))), "layer name used twice: a"),
    (lambda: mlp(layers=(Flatten(name="f"), Dense(units=1, name="head"))), "head has 1 units"),
    (lambda: mlp(layers=(Flatten(name="f"), Dense(units=10, activation="relu", name="head"))), "linear Dense"),
    (lambda: mlp(layers=(Dense(units=10, name="head"),)), "add a Flatten"),
    (lambda: mlp(batch_size=0), "batch_size must be positive"),
    (lambda: mlp(epochs=0), "epochs must be positive"),
    (lambda: mlp(stages=(Stage(name="s", trainable=("conv9",)),), primary_stage="s"), "unknown parameter layers"),
    (lambda: mlp(stages=(Stage(name="s", init="previous"),), primary_stage="s"), "first stage has no previous"),
    (lambda: Adam(epsilon_placement="sqrt_v"), "unknown epsilon_placement"),
    (lambda: Adam(lr=0), "lr must be positive"),
])
def test_invalid_specs_raise_a_clear_error(make, message):
    with pytest.raises(SpecError, match=message):
        make()


def test_softmax_before_the_loss_cannot_be_written():
    # The tutorials' classic bug: softmax output fed to a loss that applies softmax again.
    with pytest.raises(SpecError):
        mlp(layers=(Flatten(name="f"), Dense(units=10, activation="softmax", name="head")))


def test_specs_are_frozen_and_serialisable():
    spec = get_task("cifar-cnn")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.epochs = 3
    d = spec.to_dict()
    assert d["layers"][0] == {"filters": 32, "kernel_size": 3, "name": "conv1", "padding": "valid",
                              "activation": "relu", "stride": 1, "kind": "conv2d"}
    assert d["optimizer"]["epsilon_placement"] == "sqrt_v_hat"


def test_training_flops_match_the_documented_formula():
    assert get_task("mnist-mlp").train_flops_per_sample() == 3 * 2 * (784 * 128 + 128 * 10)
    assert all(t.train_flops_per_sample() > 0 for t in TASKS.values())


def test_frozen_layers_cost_only_their_forward_pass():
    spec = get_task("finetune")
    full = spec.train_flops_per_sample()
    frozen = spec.train_flops_per_sample(spec.stage("finetune").trainable)
    dense_forward = 2 * (1024 * 64 + 64 * 5)
    assert full - frozen == 2 * (full // 3 - dense_forward)  # the convs' backward is gone


def test_layers_answer_their_own_geometry():
    from tasks.spec import BatchNorm, MultiHeadSelfAttention, Residual

    conv = Conv2D(filters=8, kernel_size=3, padding="same", stride=2, name="c")
    assert conv.out_shape((7, 7, 3)) == (4, 4, 8) and conv.flops((7, 7, 3)) == 2 * 4 * 4 * 8 * 9 * 3
    assert Conv2D(filters=8, kernel_size=3, stride=2, name="c").out_shape((7, 7, 3)) == (3, 3, 8)
    attn = MultiHeadSelfAttention(heads=2, head_dim=4, name="a")
    assert [(p.name, p.shape) for p in attn.params((5, 6))] == [
        ("query_kernel", (6, 2, 4)), ("query_bias", (2, 4)), ("key_kernel", (6, 2, 4)), ("key_bias", (2, 4)),
        ("value_kernel", (6, 2, 4)), ("value_bias", (2, 4)), ("out_kernel", (2, 4, 6)), ("out_bias", (6,))]
    assert attn.flops((5, 6)) == 2 * 5 * 6 * 8 * 4 + 4 * 25 * 8
    bn = BatchNorm(name="bn")
    assert [(p.name, p.trainable) for p in bn.params((4, 4, 3))] == [
        ("scale", True), ("offset", True), ("running_mean", False), ("running_var", False)]
    with pytest.raises(SpecError, match="the body maps"):
        Residual(name="r", body=(Dense(units=3, name="d"),)).out_shape((5,))


def test_nested_layers_are_walked_and_named_flat_in_spec_order():
    from tasks.spec import BatchNorm, Residual

    spec = mlp(layers=(Flatten(name="f"), Residual(name="r", body=(
        Dense(units=784, name="d1"), Residual(name="r2", body=(BatchNorm(name="bn"),)))), Dense(units=10, name="head")))
    assert [layer.name for layer, _, _ in spec.walk()] == ["f", "r", "d1", "r2", "bn", "head"]
    assert [e.name for e in spec.params()][:4] == ["d1.kernel", "d1.bias", "bn.scale", "bn.offset"]
    assert spec.param_count() == 784 * 784 + 784 + 2 * 784 + 784 * 10 + 10  # running statistics excluded
    with pytest.raises(SpecError, match="layer name used twice: d1"):
        mlp(layers=(Flatten(name="f"), Residual(name="r", body=(Dense(units=784, name="d1"),)),
                    Dense(units=784, name="d1"), Dense(units=10, name="head")))
