"""Serving a trained model: each framework's inference path gives its logits, and the harness times it within budget."""

import numpy as np
import pytest
from conftest import configured

from harness import inference, text
from harness.data import synthetic
from harness.weights import initial_weights
from tasks import get_task


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_the_inference_path_gives_the_models_logits(backend_name, mode):
    backend = configured(backend_name)
    spec = get_task("mnist-mlp")
    x = synthetic("mnist", n_train=64, n_test=64, seed=0).x_test
    model = backend.build(spec, initial_weights(spec, 0), trainable=None, mode=mode)
    path = backend.inference(model)
    out = path.run(path.put(x))
    out = np.asarray(out.detach().cpu() if hasattr(out, "detach") else out, np.float32)  # torch: off the device
    np.testing.assert_allclose(out, backend.logits(model, x), rtol=1e-5, atol=1e-6)
    assert path.name


def test_inference_figures_take_at_least_200_calls_and_keep_to_the_call_budget(backend_name, monkeypatch):
    backend = configured(backend_name)
    spec = get_task("mnist-mlp")
    x = synthetic("mnist", n_train=64, n_test=256, seed=0).x_test
    model = backend.build(spec, initial_weights(spec, 0), trainable=None, mode="eager")
    monkeypatch.setattr(inference, "MAX_LATENCY_CALLS", 300)
    tiny = inference.measure_inference(backend, model, x, batch_size=128, train_s=1e-6)  # budget: a microsecond
    assert tiny["infer_latency_calls"] == inference.FULL.latency
    assert tiny["infer_throughput_calls"] == inference.FULL.throughput
    assert tiny["infer_latency_ms_p50"] <= tiny["infer_latency_ms_p90"] <= tiny["infer_latency_ms_p99"]
    assert tiny["infer_samples_per_s"] > 0 and tiny["infer_batch_size"] == 128
    assert tiny["infer_h2d_ms"] >= 0 and tiny["infer_peak_rss_mb"] > 0
    roomy = inference.measure_inference(backend, model, x, batch_size=128, train_s=1e4)  # budget: 1,000 s
    assert roomy["infer_latency_calls"] == 300
    assert roomy["infer_throughput_calls"] == inference.MAX_THROUGHPUT_CALLS
    assert roomy["infer_budget_s"] == pytest.approx(1e3)


def test_calls_slower_than_the_warm_up_pace_stop_at_the_budget():
    def clock():  # every reading one second later than the last
        return float(next(ticks))

    ticks = iter(range(10**6))
    # The deadline is 0 + 20 s; the check after the 21st call reads 21 s, past it.
    assert len(inference._until(lambda: None, 50, 1, budget_s=20.0, clock=clock)) == 21
    ticks = iter(range(10**6))
    assert len(inference._until(lambda: None, 50, 30, budget_s=0.0, clock=clock)) == 30  # never below the minimum
    assert len(inference._until(lambda: None, 8, 5, budget_s=1e9, clock=clock)) == 8  # never above the count


def test_quick_serving_takes_fewer_calls_and_generates_at_batch_1_only(backend_name):
    from harness.loop import served_figures
    from tasks.tiny_gpt import tiny_gpt

    backend = configured(backend_name)
    spec = tiny_gpt(context=16, d_model=16, layers=1, heads=2).sized_for(4)
    data = text.load("synthetic", "synthetic", context=16, seed=0, subset=(64, 16))
    model = backend.build(spec, initial_weights(spec, 0), trainable=None, mode="eager")
    quick = served_figures(backend, model, data, spec=spec, train_s=1e-6, quick=True)
    assert quick["infer_latency_calls"] == inference.QUICK.latency < inference.FULL.latency
    assert quick["infer_throughput_calls"] == inference.QUICK.throughput < inference.FULL.throughput
    assert quick["generate_tokens_per_s_b1"] > 0 and "generate_tokens_per_s_b32" not in quick
