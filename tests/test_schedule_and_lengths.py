"""The learning-rate schedule spans the steps a run actually takes; token logits for any length on every backend."""

import numpy as np
import pytest
from conftest import configured, require

from harness import text
from harness.loop import run_stages
from harness.weights import initial_weights
from tasks.datasets import DATASETS
from tasks.optim import WarmupCosine
from tasks.spec import SpecError
from tasks.tiny_gpt import tiny_gpt


def test_an_open_schedule_is_sized_by_the_run_and_a_fixed_one_kept():
    sized = WarmupCosine().sized(200)
    assert (sized.warmup_steps, sized.total_steps) == (10, 200)  # 5% warm-up
    assert WarmupCosine(warmup_steps=3, total_steps=50).sized(200) == WarmupCosine(warmup_steps=3, total_steps=50)
    assert WarmupCosine(warmup_steps=30).sized(200).total_steps == 200
    assert WarmupCosine().sized(1).total_steps == 2  # one step still gets a warm-up and an end
    with pytest.raises(SpecError, match="not sized"):
        WarmupCosine().factor(0)


TINY = tiny_gpt(name="tiny-gpt-schedule", d_model=16, layers=1, heads=2, context=8, batch_size=8, epochs=1)


@pytest.mark.parametrize("epochs, windows, what", [
    (1, (64, 16), "--epochs 1"),
    (4, (64, 16), "--epochs 4"),
    (1, DATASETS["text"].quick, "--quick (its subset, one epoch)"),
    (2, (40, 16), "another --data-dir (40 windows: 5 steps per epoch)"),
])
def test_the_last_step_of_the_run_is_the_last_step_of_the_schedule(epochs, windows, what):
    """The schedule reaches its end (lr 0 at step total_steps) exactly when the run has taken its last step."""
    require("torch")  # its scheduler is where the steps taken can be read
    backend = configured("torch")
    spec = TINY.with_overrides(epochs=epochs)
    data = text.synthetic(context=8, seed=1, n_windows=windows)
    built = []
    build = backend.build

    def spy(spec, weights, **kwargs):
        built.append(build(spec, weights, **kwargs))
        return built[-1]

    backend.build = spy
    try:
        run_stages(backend, spec, data, seed=0, mode="eager")
    finally:
        del backend.build
    model = built[-1]
    steps = epochs * (windows[0] // spec.batch_size)
    schedule = model.spec.optimizer.schedule
    assert schedule.total_steps == steps, what
    assert model.scheduler.last_epoch == steps, what  # the steps torch's scheduler has stepped through
    # The next step would run at the schedule's final value: the run ended with the cosine.
    assert model.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12), what
    assert model.spec.optimizer.lr_at(steps - 1) > 0


def test_token_logits_for_any_length_up_to_the_context(backend_name):
    spec = TINY.sized_for(8)
    backend = configured(backend_name)
    model = backend.build(spec, initial_weights(spec, 0), trainable=None, mode="eager")
    x = text.synthetic(context=8, seed=2, n_windows=(4, 1)).x_train
    full = backend.logits(model, x)
    for length in (1, 3, 7):
        # Causal: a prefix's logits are the full window's first positions.
        np.testing.assert_allclose(backend.logits(model, x[:, :length]), full[:, :length], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="length <= 8"):
        backend.logits(model, np.zeros((1, 9), np.int32))
