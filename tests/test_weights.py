"""Canonical initial weights and checkpoints."""

import numpy as np
import pytest
from npz_checkpoint import save_npz_checkpoint

from harness.checkpoint import CheckpointError, load_checkpoint, load_checkpoint_for, save_checkpoint
from harness.weights import initial_weights, reinitialise
from tasks import get_task


def test_initial_weights_are_glorot_uniform_zero_bias_and_seeded():
    spec = get_task("cifar-cnn")
    w = initial_weights(spec, 0)
    assert [a.shape for a in w] == [e.param.shape for e in spec.params()]
    assert all(a.dtype == np.float32 for a in w)
    conv1 = w[0]  # HWIO (3, 3, 3, 32): fan_in 27, fan_out 288
    limit = np.sqrt(6 / (27 + 288))
    assert conv1.min() >= -limit and conv1.max() <= limit and conv1.max() > 0.9 * limit
    assert not np.any(w[1])
    np.testing.assert_array_equal(w[0], initial_weights(spec, 0)[0])
    assert not np.array_equal(w[0], initial_weights(spec, 1)[0])


def test_reinitialise_redraws_only_the_named_layer():
    spec = get_task("finetune")
    w = initial_weights(spec, 0)
    r = reinitialise(spec, w, ("head",), 0, stream=2)
    for i, (a, b) in enumerate(zip(w, r)):
        if i == 8:  # head kernel
            assert not np.array_equal(a, b)
        else:
            np.testing.assert_array_equal(a, b)


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    spec = get_task("finetune")
    w = initial_weights(spec, 5)
    save_checkpoint(tmp_path / "c.safetensors", spec, w, meta={"backend": "x"})
    header, loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert header["meta"] == {"backend": "x"} and header["spec"]["name"] == "finetune"
    assert all(np.array_equal(a, b) for a, b in zip(w, load_checkpoint_for(tmp_path / "c.safetensors", spec)))
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_of_another_architecture_names_the_first_mismatch(tmp_path):
    save_checkpoint(tmp_path / "mlp.npz", get_task("mnist-mlp"), initial_weights(get_task("mnist-mlp"), 0))
    with pytest.raises(CheckpointError, match="layer 0"):
        load_checkpoint_for(tmp_path / "mlp.npz", get_task("cifar-cnn"))
    # Same layers, one array of the wrong shape: named precisely.
    spec = get_task("cifar-cnn")
    w = initial_weights(spec, 0)
    save_npz_checkpoint(tmp_path / "ok.npz", spec, w)

    with np.load(tmp_path / "ok.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["w002"] = np.zeros((3, 3, 32, 65), np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"conv2.kernel has shape \(3, 3, 32, 65\)"):
        load_checkpoint_for(tmp_path / "bad.npz", spec)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a tribench checkpoint"):
        load_checkpoint(tmp_path / "junk.npz")


def test_a_checkpoint_from_before_spec_v2_still_loads(tmp_path):
    # Written before Conv2D had a stride field: the saved layer dicts lack it.
    spec = get_task("cifar-cnn")
    w = initial_weights(spec, 0)
    save_npz_checkpoint(tmp_path / "new.npz", spec, w)
    with np.load(tmp_path / "new.npz") as z:
        arrays = {k: z[k] for k in z.files}
    import json

    header = json.loads(str(arrays["header"]))
    for layer in header["spec"]["layers"]:
        layer.pop("stride", None)
    header["spec"]["optimizer"] = {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-7,
                                   "epsilon_placement": "sqrt_v_hat", "name": "adam"}
    arrays["header"] = np.array(json.dumps(header))
    np.savez(tmp_path / "old.npz", **arrays)
    assert all(np.array_equal(a, b) for a, b in zip(load_checkpoint_for(tmp_path / "old.npz", spec), w))


def test_batchnorm_statistics_are_state_in_the_weights():
    from pathlib import Path

    from tasks.taskfile import load_task_file

    spec = load_task_file(Path(__file__).parent.parent / "examples" / "tasks" / "cifar-resnet-bn.toml")
    w = dict(zip((e.name for e in spec.params()), initial_weights(spec, 0)))
    assert [n for n in w if n.startswith("stem_bn.")] == [
        "stem_bn.scale", "stem_bn.offset", "stem_bn.running_mean", "stem_bn.running_var"]
    assert not np.any(w["stem_bn.running_mean"]) and np.all(w["stem_bn.running_var"] == 1)
    state = [e.name for e in spec.params() if not e.param.trainable]
    assert state and all(n.endswith(("running_mean", "running_var")) for n in state)


def test_an_unknown_init_is_refused_not_drawn_as_zeros():
    import pytest

    from tasks.layers import Param
    from tasks.spec import SpecError

    with pytest.raises(SpecError, match="init 'uniform' is not one of"):
        Param("w", (2, 2), "uniform")
