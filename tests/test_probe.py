"""--mode best: the probe picks the faster mode, and training after it is a forced run of that mode."""

import math

import numpy as np
import pytest
from conftest import configured

from backends.base import MODES, Backend, ModelHandle
from harness import probe
from harness.data import synthetic
from harness.loop import run_stages
from tasks import get_task
from tasks.layers import ACTIVATIONS as LAYER_ACTIVATIONS
from tasks.optim import OPTIMIZERS as OPTIMIZER_KINDS


class FakeClock:
    """A clock that only moves when a training epoch runs: `cost[mode]` seconds per step."""

    def __init__(self, cost: dict[str, float]):
        self.now, self.cost = 0.0, cost

    def __call__(self) -> float:
        return self.now


def slow_mode(monkeypatch, backend: Backend, slow: str, factor: float = 10.0) -> FakeClock:
    """Give the probe a clock on which `slow` takes `factor` times longer per step than the other mode."""
    fake = FakeClock({mode: (0.1 * factor if mode == slow else 0.1) for mode in MODES})
    real_train_epoch = type(backend).train_epoch

    def train_epoch(self, model, data, order, batch_size):
        fake.now += fake.cost[model.mode] * (len(order) // batch_size)
        return real_train_epoch(self, model, data, order, batch_size)

    monkeypatch.setattr(probe, "clock", fake)
    monkeypatch.setattr(type(backend), "train_epoch", train_epoch)
    return fake


class NumpyBackend(Backend):
    """A framework-free adapter: each step moves every weight by lr x the step's mean input."""

    name = "numpy-fake"
    LAYERS = {"dense": None, "activation": None, "flatten": None}
    # Its step ignores the activation and the optimizer's formula, so it takes every one.
    ACTIVATIONS = dict.fromkeys(LAYER_ACTIVATIONS)
    OPTIMIZERS = dict.fromkeys(OPTIMIZER_KINDS)

    class Model(ModelHandle):
        def __init__(self, spec, weights, trainable, mode):
            self.spec, self.trainable_layers, self.mode = spec, trainable, mode
            self.weights, self.steps = [w.copy() for w in weights], 0

    def import_framework(self):
        pass

    def _configure(self, **kwargs):
        pass

    def _environment(self):
        return {"framework": "numpy"}

    def _synchronize(self):
        pass

    def _put_data(self, x, y):
        return x, y

    def _build(self, spec, weights, *, trainable, mode):
        return self.Model(spec, weights, trainable, mode)

    def _get_weights(self, model):
        return [w.copy() for w in model.weights]

    def _set_weights(self, model, weights):
        model.weights, model.steps = [w.copy() for w in weights], 0

    def _train_epoch(self, model, data, order, batch_size):
        losses = []
        for batch in order.reshape(-1, batch_size):
            model.steps += 1
            step = 1e-3 * float(data[0][batch].mean()) * model.steps  # depends on the optimizer's step count
            model.weights = [w - step for w in model.weights]
            losses.append(step)
        return np.asarray(losses, np.float32)

    def _evaluate(self, model, data, batch_size):
        return float(sum(w.sum() for w in model.weights)), 0.5

    def _logits(self, model, x):
        return np.zeros((len(x), 10), np.float32)


@pytest.fixture(autouse=True)
def unbounded_probe(request, monkeypatch):
    """The tests of the choice itself run without the probe's budget; the budget's tests keep it."""
    if "budget" not in request.node.name:
        monkeypatch.setattr(probe, "PROBE_BUDGET", math.inf)


@pytest.fixture
def fake_backend():
    backend = NumpyBackend()
    backend.configure(device="cpu", threads=1, precision="fp32")
    return backend


def mlp(epochs: int = 1):
    return get_task("mnist-mlp").with_overrides(epochs=epochs)


@pytest.mark.parametrize("slow", MODES)
def test_the_probe_chooses_the_faster_mode_and_records_both_rates(monkeypatch, fake_backend, slow):
    slow_mode(monkeypatch, fake_backend, slow)
    data = synthetic("mnist", n_train=2048, n_test=256, seed=0)
    results = run_stages(fake_backend, mlp(), data, seed=0, mode="best")
    m = results["train"].metrics
    fast = next(mode for mode in MODES if mode != slow)
    assert m["mode"] == fast and m["mode_probe"]["chosen"] == fast
    bs = 128
    # 10 steps of 128 samples per 1 s (slow) or 0.1 s (fast) of the fake clock.
    assert m["mode_probe"][slow] == pytest.approx(bs / 1.0)
    assert m["mode_probe"][fast] == pytest.approx(bs / 0.1)
    # A 10x faster mode is a clear winner after the first round: no more rounds are run.
    assert m["mode_probe"]["steps"] == probe.PROBE_STEPS and m["mode_probe"]["rounds"] == 1
    # The probe's clock ran a round of at least PROBE_ROUND_S per mode (warm-up steps included).
    assert m["mode_probe"]["probe_s"] >= 2 * probe.PROBE_ROUND_S
    assert m["execution"] == f"numpy-fake {fast}" and m["mode_probe"]["programs"] == {
        mode: f"numpy-fake {mode}" for mode in MODES}


def test_close_modes_are_timed_every_round(monkeypatch, fake_backend):
    slow_mode(monkeypatch, fake_backend, "eager", factor=1.2)
    data = synthetic("mnist", n_train=2048, n_test=256, seed=0)
    m = run_stages(fake_backend, mlp(), data, seed=0, mode="best")["train"].metrics
    assert m["mode"] == "compiled" and m["mode_probe"]["rounds"] == probe.PROBE_ROUNDS
    assert m["mode_probe"]["probe_s"] >= 2 * probe.PROBE_ROUNDS * probe.PROBE_ROUND_S


def test_modes_that_run_one_program_are_one_candidate_never_timed(monkeypatch, fake_backend):
    # As JAX's "compiled" for a model with convolutions on a CPU: it runs the eager program.
    monkeypatch.setattr(NumpyBackend, "_runs_as", lambda self, spec, mode: "eager", raising=False)
    built = []
    real_build = NumpyBackend._build
    monkeypatch.setattr(NumpyBackend, "_build", lambda self, spec, weights, *, trainable, mode: built.append(mode)
                        or real_build(self, spec, weights, trainable=trainable, mode=mode))
    fake = slow_mode(monkeypatch, fake_backend, "eager")
    data = synthetic("mnist", n_train=2048, n_test=256, seed=0)
    m = run_stages(fake_backend, mlp(), data, seed=0, mode="best")["train"].metrics
    assert built == ["eager"] and m["mode"] == "eager" and m["mode_probe"]["rounds"] == 0
    assert m["mode_probe"]["programs"] == {"eager": "numpy-fake eager"}
    assert fake.now == pytest.approx(1 + 16)  # the warm-up's step and the epoch's 16: nothing timed
    forced = run_stages(fake_backend, mlp(), data, seed=0, mode="compiled")["train"].metrics
    assert forced["mode"] == "eager" and forced["execution"] == "numpy-fake eager"  # recorded as what ran


def test_a_staged_task_decides_once_in_its_first_stage(monkeypatch, fake_backend):
    slow_mode(monkeypatch, fake_backend, "eager")
    spec = get_task("finetune").with_overrides(epochs=1)
    fake_backend.LAYERS = {kind: None for kind in {layer.kind for layer, _, _ in spec.walk()}}
    data = synthetic("cifar10", n_train=1024, n_test=256, seed=0)
    stages = run_stages(fake_backend, spec, data, seed=0, mode="best")
    first, *later = stages.values()
    assert first.metrics["mode_probe"]["chosen"] == "compiled"
    assert all(s.metrics["mode"] == "compiled" and s.metrics["mode_probe"] is None for s in later)
    from harness.loop import flatten_metrics

    assert flatten_metrics(spec, stages, peak_gflops=None)["mode_probe"] == first.metrics["mode_probe"]


def test_a_short_epoch_probes_fewer_steps(monkeypatch, fake_backend):
    slow_mode(monkeypatch, fake_backend, "eager")
    data = synthetic("mnist", n_train=3 * 128 + 5, n_test=256, seed=0)
    m = run_stages(fake_backend, mlp(), data, seed=0, mode="best")["train"].metrics
    assert m["mode_probe"]["steps"] == 3 and m["mode"] == "compiled"


def test_a_forced_mode_runs_no_probe(monkeypatch, fake_backend):
    fake = slow_mode(monkeypatch, fake_backend, "eager")
    data = synthetic("mnist", n_train=2048, n_test=256, seed=0)
    m = run_stages(fake_backend, mlp(), data, seed=0, mode="eager")["train"].metrics
    assert m["mode"] == "eager" and m["mode_probe"] is None
    assert fake.now == pytest.approx(1 + 16)  # the warm-up's step and the epoch's 16, nothing else


def test_a_mode_the_backend_cannot_build_is_left_out_of_the_probe(monkeypatch, fake_backend):
    """TF cannot compile a training BatchNorm over CPU replicas: best mode trains eager and says why."""
    from backends.base import BackendUnavailable

    slow_mode(monkeypatch, fake_backend, "eager")  # compiled would win if it could be built
    real_build = NumpyBackend._build

    def build(self, spec, weights, *, trainable, mode):
        if mode == "compiled":
            raise BackendUnavailable("no compiled mode here")
        return real_build(self, spec, weights, trainable=trainable, mode=mode)

    monkeypatch.setattr(NumpyBackend, "_build", build)
    data = synthetic("mnist", n_train=2048, n_test=256, seed=0)
    m = run_stages(fake_backend, mlp(), data, seed=0, mode="best")["train"].metrics
    assert m["mode"] == "eager" and m["mode_probe"]["compiled"] is None
    assert m["mode_probe"]["unavailable"] == {"compiled": "no compiled mode here"}


@pytest.mark.slow
@pytest.mark.parametrize("slow", MODES)
def test_training_after_the_probe_is_a_forced_run_of_the_chosen_mode(monkeypatch, backend_name, slow):
    """Same initial loss, same per-epoch losses, same final weights as `--mode <chosen>`, bit for bit."""
    backend = configured(backend_name)
    slow_mode(monkeypatch, backend, slow)
    chosen = next(mode for mode in MODES if mode != slow)
    spec, data = mlp(epochs=2), synthetic("mnist", n_train=1024, n_test=256, seed=0)
    best = run_stages(backend, spec, data, seed=0, mode="best")["train"]
    forced = run_stages(backend, spec, data, seed=0, mode=chosen)["train"]
    assert best.metrics["mode"] == chosen == forced.metrics["mode"]
    for key in ("initial_test_loss", "epoch_train_loss", "epoch_test_loss"):
        assert best.metrics[key] == forced.metrics[key], key
    assert all(np.array_equal(a, b) for a, b in zip(best.weights, forced.weights))


def test_rates_within_the_probes_noise_choose_the_eager_program(monkeypatch, fake_backend):
    slow_mode(monkeypatch, fake_backend, "eager", factor=1.03)  # compiled 3% faster: a tie
    data = synthetic("mnist", n_train=2048, n_test=256, seed=0)
    m = run_stages(fake_backend, mlp(), data, seed=0, mode="best")["train"].metrics
    assert m["mode"] == probe.TIE_CHOICE == "eager" and m["mode_probe"]["compiled"] > m["mode_probe"]["eager"]
    assert probe.faster({"compiled": 110.0, "eager": 100.0}, candidates=MODES) == "compiled"


def built_modes(monkeypatch) -> list[str]:
    built = []
    real_build = NumpyBackend._build
    monkeypatch.setattr(NumpyBackend, "_build", lambda self, spec, weights, *, trainable, mode: built.append(mode)
                        or real_build(self, spec, weights, trainable=trainable, mode=mode))
    return built


def test_a_training_shorter_than_the_probe_leaves_the_rivals_untried_within_budget(monkeypatch, fake_backend):
    # 3 training steps; the eager warm-up and a round, on the probe's 1-step chunk, take 2, a rival
    # at least as many: over the budget.
    built = built_modes(monkeypatch)
    fake = slow_mode(monkeypatch, fake_backend, "eager")  # compiled would win if it were tried
    data = synthetic("mnist", n_train=3 * 128 + 5, n_test=256, seed=0)
    m = run_stages(fake_backend, mlp(), data, seed=0, mode="best", quick=True)["train"].metrics
    assert built == ["eager"] and m["mode"] == probe.TIE_CHOICE == "eager"
    p = m["mode_probe"]
    assert p["chosen"] == "eager" and p["compiled"] is None and p["rounds"] == 0 and list(p["untried"]) == ["compiled"]
    assert p["eager"] == pytest.approx(128 / 1.0) and p["budget_s"] == pytest.approx(3 * 1.0 * probe.PROBE_BUDGET)
    assert p["steps"] == 1 and p["first_round_s"] == {"eager": pytest.approx(2.0)}
    # Probing (a warm-up step, a round of 1) cost less than the training's 3 steps; then the
    # epoch (3). The training's warm-up is the probe's: the model was warmed for these batch sizes.
    assert fake.now == pytest.approx((1 + 1 + 3) * 1.0)
    assert m["warmup_s"] < 0.5


def test_outside_quick_a_short_training_still_tries_the_rival_within_the_budget_floor(monkeypatch, fake_backend):
    # The training of the first budget test (3 steps of 1 s), not --quick: its budget is the floor,
    # so the faster compiled program is tried and trains.
    built = built_modes(monkeypatch)
    slow_mode(monkeypatch, fake_backend, "eager")
    data = synthetic("mnist", n_train=3 * 128 + 5, n_test=256, seed=0)
    m = run_stages(fake_backend, mlp(), data, seed=0, mode="best")["train"].metrics
    p = m["mode_probe"]
    assert built == ["eager", "compiled"] and "untried" not in p and p["budget_s"] == probe.PROBE_FLOOR_S
    assert m["mode"] == p["chosen"] == "compiled" and p["compiled"] > p["eager"]


def test_the_probe_stops_its_rounds_at_its_budget(monkeypatch, fake_backend):
    # 32 training steps of eager at 0.12 s (budget half of 3.84 s), chunks of 2 steps: eager costs
    # 0.72 s (warm-up and a round), the rival fits, a second round ends past the budget: no third.
    built = built_modes(monkeypatch)
    slow_mode(monkeypatch, fake_backend, "eager", factor=1.2)
    data = synthetic("mnist", n_train=2048, n_test=256, seed=0)
    m = run_stages(fake_backend, mlp(epochs=2), data, seed=0, mode="best", quick=True)["train"].metrics
    p = m["mode_probe"]
    assert built == ["eager", "compiled"] and "untried" not in p and p["steps"] == 2
    assert p["rounds"] == 2 < probe.PROBE_ROUNDS and p["budget_s"] == pytest.approx(32 * 0.12 * probe.PROBE_BUDGET)
    assert m["mode"] == "compiled" and p["compiled"] > p["eager"]


def test_a_second_identical_cell_reads_the_decision_instead_of_probing(monkeypatch, fake_backend, tmp_path):
    from harness.mode_cache import ModeCache

    built = built_modes(monkeypatch)
    fake = slow_mode(monkeypatch, fake_backend, "eager")
    data = synthetic("mnist", n_train=2048, n_test=256, seed=0)
    cache = ModeCache(tmp_path / "modes", {"threads": 1})
    first = run_stages(fake_backend, mlp(), data, seed=0, mode="best", mode_cache=cache)["train"].metrics
    assert first["mode"] == "compiled" and "cached_at" not in first["mode_probe"]
    built.clear()
    before = fake.now
    second = run_stages(fake_backend, mlp(), data, seed=1, mode="best", mode_cache=cache)["train"].metrics
    assert built == ["compiled"] and second["mode"] == "compiled"  # no rival built, nothing timed
    assert fake.now - before == pytest.approx((1 + 16) * 0.1)  # the warm-up and the epoch only
    p = second["mode_probe"]
    assert p["cached_at"] and p["probe_s"] == 0.0 and p["cached_probe_s"] == first["mode_probe"]["probe_s"]
    assert p["compiled"] == first["mode_probe"]["compiled"] and p["eager"] == first["mode_probe"]["eager"]


def test_a_short_training_is_estimated_from_short_chunks_within_budget(monkeypatch, fake_backend):
    # 3 epochs of 16 steps, half of them the budget: chunks of 24 // 8 = 3 steps, not 10.
    fake = slow_mode(monkeypatch, fake_backend, "compiled")
    data = synthetic("mnist", n_train=2048, n_test=256, seed=0)
    m = run_stages(fake_backend, mlp(epochs=3), data, seed=0, mode="best", quick=True)["train"].metrics
    assert m["mode_probe"]["steps"] == 3 and m["mode_probe"]["eager"] == pytest.approx(128 / 0.1)
    assert probe.probe_order(np.arange(2048), 128, train_steps=4000).size == probe.PROBE_STEPS * 128
    assert probe.probe_order(np.arange(2048), 128, train_steps=3).size == 128  # never below one step
    assert fake.now > 0
