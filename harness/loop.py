"""THE training loop: stages, shared batch order, evaluation cadence, timing. One copy for all backends."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from backends.base import BEST, Backend, is_causal_lm
from harness import inference
from harness.arrays import Dataset
from harness.checkpoint import SUFFIX, save_checkpoint
from harness.generation import BATCHES, QUICK_BATCHES, measure_generation
from harness.mode_cache import ModeCache
from harness.probe import PROBE_FLOOR_S, probe_modes
from harness.weights import initial_weights, reinitialise
from tasks.spec import TaskSpec

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, stage: str, epoch: int, step: int, loss: float):
        super().__init__(f"loss became {loss} in stage {stage!r} at epoch {epoch} step {step}")
        self.stage, self.epoch, self.step = stage, epoch, step


def epoch_order(seed: int, stage_index: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """The batch order every backend follows: a seeded permutation, the last partial batch dropped.

    Dropping the remainder keeps every step the same shape, so no backend recompiles
    for a ragged final batch; at most batch_size - 1 samples per epoch go unseen.
    """
    steps = n // batch_size
    if steps == 0:
        raise ValueError(f"{n} training samples are fewer than one batch of {batch_size}")
    return np.random.default_rng([seed, 1, stage_index, epoch]).permutation(n)[: steps * batch_size].astype(np.int32)


@dataclass
class StageResult:
    name: str
    metrics: dict = field(default_factory=dict)
    weights: list[np.ndarray] | None = None


def timed(backend: Backend, fn: Callable, *args):
    """Run fn and return (result, seconds) measured after the device has finished."""
    backend.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    backend.synchronize()
    return out, time.perf_counter() - t0


def stage_weights(spec: TaskSpec, index: int, previous: list[np.ndarray] | None, seed: int) -> list[np.ndarray]:
    stage = spec.stages[index]
    weights = initial_weights(spec, seed) if stage.init == "seed" else previous
    if stage.reinit:
        # A separate random stream per stage: the fresh head differs from the pretrain head.
        weights = reinitialise(spec, weights, stage.reinit, seed, stream=index + 1)
    return weights


def train_stage(backend: Backend, spec: TaskSpec, index: int, data: Dataset, weights: list[np.ndarray], *,
                seed: int, mode: str, progress: Callable[[dict], None], mode_cache: ModeCache | None = None,
                quick: bool = False) -> StageResult:
    stage = spec.stages[index]
    data = data.classes(stage.classes)
    bs, ebs = spec.batch_size, spec.eval_batch_size
    n = len(data.y_train)
    # The schedule spans this stage's steps: epochs x the steps per epoch of the data it trains on.
    spec = spec.sized_for(n // bs)
    train, test = backend.put_data(data.x_train, data.y_train), backend.put_data(data.x_test, data.y_test)
    probe = None
    # The seed is left out of the cache's key: it changes neither program nor step.
    key = mode_cache.key(backend.name, {**spec.to_dict(), "seed": None}, n // bs) if mode_cache and mode == BEST \
        else None
    if key and (probe := mode_cache.lookup(key, backend.distinct_modes(spec))):
        mode = probe["chosen"]  # an earlier identical cell's decision, its estimates and date in the record
        model = backend.build(spec, weights, trainable=stage.trainable, mode=mode)
    elif mode == BEST:  # probe time is reported as metrics.mode_probe.probe_s, on neither clock below
        mode, model, probe = probe_modes(backend, spec, weights, trainable=stage.trainable, train=train, test=test,
                                         order=epoch_order(seed, index, 0, n, bs), train_steps=spec.epochs * (n // bs),
                                         floor_s=0.0 if quick else PROBE_FLOOR_S)
        if key:
            mode_cache.store(key, probe, at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    else:
        mode = backend.execution(spec, mode)[0]  # a mode that runs another's program is recorded as that one
        model = backend.build(spec, weights, trainable=stage.trainable, mode=mode)

    _, warmup_s = timed(backend, backend.warmup, model, train, epoch_order(seed, index, 0, n, bs), bs, test, ebs)
    (initial_loss, initial_acc), _ = timed(backend, backend.evaluate, model, test, ebs)

    m = {"initial_test_loss": initial_loss, "initial_test_accuracy": initial_acc, "warmup_s": warmup_s,
         "epoch_train_loss": [], "epoch_test_accuracy": [], "epoch_test_loss": [], "epoch_s": [],
         "epoch_train_time_s": [], "eval_s": [], "time_to_target_s": None,
         "n_train": n, "n_test": int(len(data.y_test)), "batch_size": bs, "trainable": stage.trainable,
         "schedule": dataclasses.asdict(spec.optimizer.schedule),
         "params_total": spec.param_count(), "params_trainable": spec.param_count(stage.trainable),
         "mode": mode, "execution": backend.execution(spec, mode)[1], "mode_probe": probe}
    train_clock = 0.0
    for epoch in range(spec.epochs):
        order = epoch_order(seed, index, epoch, n, bs)
        losses, seconds = timed(backend, backend.train_epoch, model, train, order, bs)
        losses = np.asarray(losses, np.float64)
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            raise Diverged(stage.name, epoch, int(bad[0]), float(losses[bad[0]]))
        train_clock += seconds
        (test_loss, test_acc), eval_seconds = timed(backend, backend.evaluate, model, test, ebs)
        m["epoch_train_loss"].append(float(losses.mean()))
        m["epoch_test_accuracy"].append(test_acc)
        m["epoch_test_loss"].append(test_loss)
        m["epoch_s"].append(seconds)
        m["epoch_train_time_s"].append(train_clock)
        m["eval_s"].append(eval_seconds)
        if m["time_to_target_s"] is None and reached_target(spec, test_loss, test_acc):
            m["time_to_target_s"] = train_clock  # evaluation time is not on this clock
        progress({"event": "epoch", "stage": stage.name, "epoch": epoch + 1, "epochs": spec.epochs,
                  "train_loss": float(losses.mean()), "test_loss": test_loss, "test_accuracy": test_acc,
                  "epoch_s": seconds, "objective": spec.objective})

    trained = len(order) * spec.epochs
    m.update(test_accuracy=m["epoch_test_accuracy"][-1], test_loss=m["epoch_test_loss"][-1],
             train_samples_per_s=trained / train_clock if train_clock > 0 else None,
             eval_samples_per_s=m["n_test"] * spec.epochs / sum(m["eval_s"]) if sum(m["eval_s"]) > 0 else None)
    if spec.takes_tokens:
        m.update(sequence_metrics(spec, m, byte_level=data.tokenizer is None))
    if stage.name == spec.primary_stage:  # the trained model the record is about, served
        m.update(served_figures(backend, model, data, spec=spec, train_s=warmup_s + train_clock + sum(m["eval_s"]),
                                quick=quick))
    return StageResult(stage.name, m, backend.get_weights(model))


def served_figures(backend: Backend, model, data: Dataset, *, spec: TaskSpec, train_s: float,
                   quick: bool = False) -> dict:
    """The trained model served: inference figures, and generation for a language model (under --quick
    from fewer latency calls and at batch 1 only: a smoke run checks that serving works).

    A failure there is recorded under infer_error / generate_error, never fatal to the training figures.
    """
    parts = {"infer": lambda: inference.measure_inference(backend, model, data.x_test,
                                                          batch_size=spec.eval_batch_size, train_s=train_s,
                                                          minimums=inference.QUICK if quick else inference.FULL)}
    if is_causal_lm(spec):
        parts["generate"] = lambda: measure_generation(backend, model, data.x_test,
                                                       batches=QUICK_BATCHES if quick else BATCHES)
    out: dict = {}
    for name, measure in parts.items():
        started = time.perf_counter()
        try:
            out.update(measure())
        except Exception as exc:  # any framework error: the training figures above stand on their own
            log.warning("%s: %s figures failed: %s", backend.name, name, exc)
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
        out[f"{name}_s"] = time.perf_counter() - started
    return out


def reached_target(spec: TaskSpec, loss: float, accuracy: float) -> bool:
    """A task judged by loss reaches its target by the held-out loss, others by accuracy."""
    return loss <= spec.target_loss if spec.objective == "loss" else accuracy >= spec.target_accuracy


def sequence_metrics(spec: TaskSpec, m: dict, *, byte_level: bool = True) -> dict:
    """Per-token rates and bits per byte for a token model: every position of a window is one prediction.

    Bits per byte is the loss in nats over ln 2, exact for byte-level models (one token, one
    byte); with a tokenizer a token spans several bytes, and the bits-per-byte figures are None.
    """
    per_sample = spec.input_shape[0]
    train, evaluate = m["train_samples_per_s"], m["eval_samples_per_s"]

    def bits(loss):
        return loss / math.log(2) if byte_level else None

    return {"context": per_sample, "train_tokens_per_s": train * per_sample if train is not None else None,
            "eval_tokens_per_s": evaluate * per_sample if evaluate is not None else None,
            "bits_per_byte": bits(m["test_loss"]), "initial_bits_per_byte": bits(m["initial_test_loss"]),
            "epoch_bits_per_byte": [bits(v) for v in m["epoch_test_loss"]] if byte_level else None,
            "target_loss": spec.target_loss}


def run_stages(backend: Backend, spec: TaskSpec, data: Dataset, *, seed: int, mode: str,
               init_from: list[np.ndarray] | None = None, checkpoint_prefix: Path | None = None,
               progress: Callable[[dict], None] = lambda event: None,
               stage_data: dict[str, Dataset] | None = None, mode_cache: ModeCache | None = None,
               quick: bool = False) -> dict[str, StageResult]:
    """Train every stage in order; returns per-stage results.

    `stage_data`: the data of stages that name their own corpus (Stage.data), by stage name.
    `mode_cache`: --mode best's decisions of earlier identical cells (harness.mode_cache).
    `quick`: --quick, whose serving figures come from fewer calls (served_figures) and whose probe
    has no floor under its budget (harness.probe.PROBE_FLOOR_S).

    `init_from` (canonical weights, e.g. from another backend's checkpoint) stands in
    for the stages before the first stage that starts from earlier weights; a task
    without such a stage starts its first stage from them instead of the seed.
    """
    first = 0
    previous = None
    if init_from is not None:
        first = next((i for i, s in enumerate(spec.stages) if s.init != "seed"), 0)
        previous = init_from
    results: dict[str, StageResult] = {}
    for index in range(first, len(spec.stages)):
        stage = spec.stages[index]
        if init_from is not None and index == first and stage.init == "seed":
            weights = init_from
        elif stage.init not in ("seed", "previous"):  # a named earlier stage's weights (init_from if it was skipped)
            named = results.get(stage.init)
            weights = stage_weights(spec, index, named.weights if named else init_from, seed)
        else:
            weights = stage_weights(spec, index, previous, seed)
        own = (stage_data or {}).get(spec.stages[index].name, data)
        result = train_stage(backend, spec, index, own, weights, seed=seed, mode=mode, progress=progress,
                             mode_cache=mode_cache, quick=quick)
        mode = result.metrics["mode"]  # --mode best decides once per cell: later stages train in the first's choice
        if checkpoint_prefix is not None:
            path = Path(f"{checkpoint_prefix}-{result.name}{SUFFIX}")
            save_checkpoint(path, spec, result.weights, meta={"stage": result.name, "backend": backend.name})
            result.metrics["checkpoint"] = str(path)
        results[result.name] = result
        previous = result.weights
    return results


def flatten_metrics(spec: TaskSpec, results: dict[str, StageResult], *, peak_gflops: float | None) -> dict:
    """The record's metrics: the primary stage's at top level, every stage under `stages`."""
    primary = results[spec.primary_stage].metrics
    metrics = {k: v for k, v in primary.items() if k != "trainable"}
    metrics["stages"] = {name: r.metrics for name, r in results.items()}
    metrics["warmup_s"] = sum(r.metrics["warmup_s"] for r in results.values())
    # --mode best decided in the first stage for all: its probe heads the record, whichever stage is primary.
    metrics["mode_probe"] = next((r.metrics["mode_probe"] for r in results.values() if r.metrics["mode_probe"]), None)
    # Parity of the starting point: the first stage run starts from the same weights on
    # every backend; later stages start from each backend's own training.
    first = next(iter(results.values())).metrics
    metrics["initial_test_loss"] = first["initial_test_loss"]
    metrics["initial_test_accuracy"] = first["initial_test_accuracy"]
    flops = spec.train_flops_per_sample(primary.get("trainable"))
    metrics["train_flops_per_sample"] = flops
    rate = primary.get("train_samples_per_s")
    metrics["roofline_fraction"] = rate * flops / (peak_gflops * 1e9) if rate and peak_gflops else None
    metrics.update(spec.stage_figures({name: r.metrics for name, r in results.items()}))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
