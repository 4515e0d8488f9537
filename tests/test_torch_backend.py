"""PyTorch-specific: the Flatten permutation that makes NCHW flattening match the canonical NHWC."""

import numpy as np
import pytest

pytest.importorskip("torch")

from backends.torch_backend import _flatten_permutation  # noqa: E402


@pytest.mark.parametrize("hwc", [(4, 4, 64), (3, 5, 2), (28, 28, 1)])
def test_flatten_permutation_maps_nchw_features_to_nhwc_rows(hwc):
    x = np.random.default_rng(0).random(hwc)
    perm = _flatten_permutation(hwc)
    assert sorted(perm) == list(range(x.size))  # a permutation
    # torch's Flatten on NCHW gives feature j = x.transpose(2, 0, 1).ravel()[j]; the
    # canonical Dense row for it is perm[j] in the NHWC flattening.
    np.testing.assert_array_equal(x.transpose(2, 0, 1).ravel(), x.ravel()[perm])
    if hwc[2] > 1:
        assert not np.array_equal(perm, np.arange(x.size))  # it matters (logits parity checks the rest)
