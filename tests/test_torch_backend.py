"""PyTorch-specific: canonical <-> torch layouts, NHWC flattening from channels_last, TensorFlow's "same" padding."""

import numpy as np
import pytest

pytest.importorskip("torch")

from backends.torch_backend import LAYERS, _same_padding  # noqa: E402


@pytest.mark.parametrize("kind, param, shape", [
    ("dense", "kernel", (7, 5)), ("conv2d", "kernel", (3, 3, 4, 8)),
    ("multiheadselfattention", "query_kernel", (8, 2, 3)), ("multiheadselfattention", "query_bias", (2, 3)),
    ("multiheadselfattention", "out_kernel", (2, 3, 8))])
def test_layouts_round_trip_and_are_not_the_identity(kind, param, shape):
    to_torch, to_canonical = LAYERS[kind].layouts[param]
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    t = to_torch(a)
    np.testing.assert_array_equal(to_canonical(t, shape), a)
    assert t.shape != a.shape or not np.array_equal(t, a)


@pytest.mark.parametrize("size, k, s, want", [(32, 3, 1, (1, 1)), (32, 3, 2, (0, 1)), (7, 4, 1, (1, 2)),
                                               (5, 1, 2, (0, 0))])
def test_same_padding_puts_the_odd_row_last_as_tensorflow_does(size, k, s, want):
    assert _same_padding(size, k, s) == want
    top, bottom = want
    assert (size + top + bottom - k) // s + 1 == -(-size // s)  # the output size "same" promises


def test_cpu_runs_flush_denormals_and_say_so():
    """Issue 13: a CPU run flushes denormals (as TensorFlow's kernels and XLA's matmuls do) and records it."""
    import torch

    from backends.torch_backend import TorchBackend

    b = TorchBackend()
    b.configure(device="cpu", threads=2, precision="fp32")
    assert b.environment()["flush_denormal"] is True
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a float32 denormal
    assert (tiny * 1.0).item() == 0.0
