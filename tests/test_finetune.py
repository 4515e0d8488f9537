"""Freeze-and-finetune through the harness loop, and checkpoints that cross backends."""

import numpy as np
import pytest
from conftest import configured

from harness.checkpoint import load_checkpoint_for
from harness.data import synthetic
from harness.loop import run_stages
from harness.weights import initial_weights
from tasks import get_task

CONV = ("conv1", "conv2", "conv3")


def small_finetune():
    # Two epochs per stage on 1,280 samples: enough to move every trainable weight.
    spec = get_task("finetune").with_overrides(epochs=2, batch_size=64, eval_batch_size=500)
    return spec, synthetic("cifar10", n_train=1280, n_test=500, seed=0)


def by_layer(spec, weights):
    names = [e.name for e in spec.params()]
    return dict(zip(names, weights))


def test_stage_two_freezes_the_convolutions_and_redraws_the_head(backend_name, tmp_path):
    spec, data = small_finetune()
    results = run_stages(configured(backend_name), spec, data, seed=0, mode="compiled",
                         checkpoint_prefix=tmp_path / "ck")
    pre, fine, scratch = (by_layer(spec, results[s].weights) for s in ("pretrain", "finetune", "scratch"))
    for name in pre:
        if name.split(".")[0] in CONV:
            assert np.array_equal(pre[name], fine[name]), f"{name} moved while frozen"
        elif name.endswith("kernel"):
            assert not np.array_equal(pre[name], fine[name]), f"{name} did not train in stage 2"
    fresh_head = by_layer(spec, initial_weights(spec, 0))["head.kernel"]
    assert not np.array_equal(scratch["conv1.kernel"], pre["conv1.kernel"])  # scratch trains everything
    assert not np.array_equal(fine["head.kernel"], fresh_head)
    m = results["finetune"].metrics
    assert m["params_trainable"] < m["params_total"] == results["scratch"].metrics["params_trainable"]
    assert (tmp_path / "ck-pretrain.safetensors").exists() and m["checkpoint"].endswith("ck-finetune.safetensors")


def test_a_torch_checkpoint_is_finetuned_by_jax(tmp_path):
    from conftest import require

    require("torch")
    require("jax")
    spec, data = small_finetune()
    run_stages(configured("torch"), spec.with_overrides(epochs=1), data, seed=0, mode="compiled",
               checkpoint_prefix=tmp_path / "torch")
    pretrained = load_checkpoint_for(tmp_path / "torch-pretrain.safetensors", spec)
    results = run_stages(configured("jax"), spec, data, seed=0, mode="compiled", init_from=pretrained)
    assert list(results) == ["finetune", "scratch"]  # pretraining skipped
    fine = by_layer(spec, results["finetune"].weights)
    start = by_layer(spec, pretrained)
    for name in CONV:
        np.testing.assert_array_equal(fine[f"{name}.kernel"], start[f"{name}.kernel"])
    # The imported features are used: jax reproduces torch's logits from the checkpoint.
    x = data.x_test[:32]
    jax_b, torch_b = configured("jax"), configured("torch")
    logits_jax = jax_b.logits(jax_b.build(spec, pretrained, trainable=None, mode="eager"), x)
    logits_torch = torch_b.logits(torch_b.build(spec, pretrained, trainable=None, mode="eager"), x)
    np.testing.assert_allclose(logits_jax, logits_torch, atol=1e-4, rtol=0)  # CNN tolerance, see test_parity


@pytest.mark.parametrize("task", ["cifar-cnn", "finetune"])
def test_export_import_round_trip_after_training(backend_name, task, tmp_path):
    """Trained (not just initial) weights survive export -> checkpoint -> import bit for bit."""
    from harness.checkpoint import save_checkpoint

    backend = configured(backend_name)
    spec = get_task(task).with_overrides(epochs=1, batch_size=64)
    data = synthetic("cifar10", n_train=256, n_test=64, seed=1)
    model = backend.build(spec, initial_weights(spec, 0), trainable=None, mode="compiled")
    y = data.y_train % spec.layers[-1].units
    backend.train_epoch(model, backend.put_data(data.x_train, y), np.arange(256, dtype=np.int32), 64)
    trained = backend.get_weights(model)
    save_checkpoint(tmp_path / "c.npz", spec, trained)
    loaded = load_checkpoint_for(tmp_path / "c.npz", spec)
    again = backend.get_weights(backend.build(spec, loaded, trainable=None, mode="compiled"))
    assert all(np.array_equal(a, b) for a, b in zip(trained, again))
