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


# Run in a fresh interpreter: the flag is per-thread process state, and the case that matters is
# a thread pool started, unflushed, before the adapter configures torch.
_FLUSH_AFTER_THE_POOL = """
import json, sys, torch
from backends import torch_backend as tb
torch.set_num_threads(2)
before = tb._denormals_survive(torch)  # starts the OpenMP pool with denormals kept
if sys.argv[1] == "configure":
    b = tb.TorchBackend()
    b.configure(device="cpu", threads=2, precision="fp32")
    flag = b.environment()["flush_denormal"]
else:  # the flag on the calling thread only, as torch.set_flush_denormal alone sets it
    flag = torch.set_flush_denormal(True)
print(json.dumps({"before": before, "after": tb._denormals_survive(torch), "flag": flag}))
"""


@pytest.mark.parametrize("how", ["configure", "main_thread_only"])
def test_cpu_runs_flush_denormals_on_every_worker_and_say_so(how):
    """Issue 13: configure flushes denormals on every thread of a pool started before it, and records it.

    The control (torch's flag on the calling thread alone) leaves the worker's half of the
    probe's denormals standing: the probe can fail, and would have without the broadcast.
    """
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FLUSH_AFTER_THE_POOL, how], capture_output=True, text=True,
                         check=True, timeout=120)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] > 0  # the denormals survive before any flag
    if how == "configure":
        assert seen == {**seen, "after": 0, "flag": True}
    else:
        assert 0 < seen["after"] < seen["before"]  # the main thread's share flushed, the worker's not
