"""--mode best: time a short probe of each mode's training step on the cell's own data, train in the faster."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from backends.base import MODES, Backend, BackendUnavailable
from tasks.spec import TaskSpec

# A probe round runs each mode for chunks of PROBE_STEPS steps until it has PROBE_ROUND_S seconds
# of them (a 10-step MLP chunk lasts milliseconds, too short to time on a busy CPU); the rounds
# alternate the modes, so a burst of load from elsewhere hits both, and each mode's best round
# counts (interference only ever slows a round down). A mode CLEAR_WIN times faster than every
# other after a round has won: more rounds would only cost time (docs/modes.md).
# Rates within TIE of each other are the probe's noise: then the eager program, which compiles
# least, is chosen, so two runs that cannot tell the modes apart still choose alike.
PROBE_STEPS = 10
PROBE_ROUND_S = 0.3
PROBE_ROUNDS = 3
CLEAR_WIN = 1.5
TIE = 1.05
TIE_CHOICE = "eager"
# The probe's budget: at most PROBE_BUDGET times the training it decides, estimated from the
# tie choice's first round (training steps / its rate). Every other candidate costs at least a
# build and warm-up like the tie choice's (compiling costs more: torch.compile several times
# more) and a round: when that does not fit, the tie choice trains, the rivals untried, and the
# record says why (`untried`). Half, so that a rival whose compile outgrows that lower bound
# still keeps the probe within the training's own time.
PROBE_BUDGET = 0.5
# Outside --quick the budget is at least PROBE_FLOOR_S: a run that is not a smoke run is there for
# its training rates, and a short training (mnist-mlp's 5 epochs, seconds on a CPU) would otherwise
# leave a compiled program that trains 20-30% faster untried (docs/modes.md).
PROBE_FLOOR_S = 10.0
# A chunk is at most 1/CHUNK_SHARE of the budget's steps, so a short training (a --quick epoch of
# 4 GPT steps) is estimated from a step or two, not from an epoch's worth of probing.
CHUNK_SHARE = 8


def clock() -> float:
    """The probe's clock (a module function, so a test can give one mode a slow fake clock)."""
    return time.perf_counter()


def probe_order(order: np.ndarray, batch_size: int, train_steps: int | None = None) -> np.ndarray:
    """The first PROBE_STEPS batches of the cell's first epoch (fewer when the epoch, or the budget's
    share of the training's `train_steps`, is shorter)."""
    steps = min(PROBE_STEPS, len(order) // batch_size)
    if train_steps is not None and math.isfinite(PROBE_BUDGET):
        steps = min(steps, max(1, int(PROBE_BUDGET * train_steps) // CHUNK_SHARE))
    return order[: steps * batch_size]


def probe_modes(backend: Backend, spec: TaskSpec, weights: list[np.ndarray], *, trainable, train: Any, test: Any,
                order: np.ndarray, train_steps: int | None = None, floor_s: float = 0.0) -> tuple[str, Any, dict]:
    """Build, warm and time a model per distinct program; returns (faster mode, its model, probe info).

    Modes that run the same program here (Backend.distinct_modes) are one candidate, timed
    once; with one candidate nothing is timed. The tie choice is built and timed first; the
    others only while the probe stays within PROBE_BUDGET of the training's `train_steps`
    (None: no budget), or within `floor_s` where that is more. The returned model holds
    `weights` and a fresh optimizer state (Backend.set_weights), so the training that follows
    is the one a forced run of that mode would do.
    """
    bs, ebs = spec.batch_size, spec.eval_batch_size
    started = clock()
    order = probe_order(order, bs, train_steps)
    candidates = sorted(backend.distinct_modes(spec), key=lambda mode: mode != TIE_CHOICE)  # the tie choice first
    models, unavailable, costs = {}, {}, {}
    best: dict[str, float | None] = {mode: None for mode in MODES}
    rounds, budget_s, skipped = 0, None, None
    for index, mode in enumerate(candidates):
        if index and budget_s is not None and models:
            # The rivals' lower bound: a build and warm-up and a round each, like the tie choice's.
            need = clock() - started + sum(costs.values()) * (len(candidates) - index) / len(costs)
            if backend.rank0_value(need > budget_s):
                skipped = candidates[index:]
                break
        t0 = clock()
        try:
            models[mode] = backend.build(spec, weights, trainable=trainable, mode=mode)
        except BackendUnavailable as exc:  # e.g. TF compiled BatchNorm over CPU replicas: the other mode only
            unavailable[mode] = str(exc)
            continue
        if len(candidates) > 1:  # a lone candidate is warmed by the training loop
            backend.warmup(models[mode], train, order, bs, test, ebs)  # compiles for the probe's length
            best[mode] = time_round(backend, models[mode], train, order, bs)
            costs[mode] = clock() - t0
            if budget_s is None and train_steps is not None:
                budget_s = max(PROBE_BUDGET * train_steps * bs / best[mode], floor_s)
    if not models:
        raise BackendUnavailable("; ".join(unavailable.values()))
    rounds = 1 if len(models) > 1 else 0
    # Replica processes must run as many rounds as rank 0 (each train_epoch is collective).
    while len(models) > 1 and rounds < PROBE_ROUNDS and not backend.rank0_value(
            clear_winner(best) or (budget_s is not None and clock() - started >= budget_s)):
        rounds += 1
        for mode in models:
            best[mode] = max(best[mode] or 0.0, time_round(backend, models[mode], train, order, bs))
    # Replica processes time their own probes; all must train in the mode rank 0 chose.
    chosen = backend.rank0_value(faster(best, candidates=tuple(models)))
    model = models.pop(chosen)
    models.clear()  # the other mode's model and compiled code are not needed for training
    if best[chosen] is not None:  # timed rounds trained it
        backend.set_weights(model, weights)
    info = {**best, "chosen": chosen, "probe_s": clock() - started, "steps": len(order) // bs, "rounds": rounds,
            "programs": {mode: backend.execution(spec, mode)[1] for mode in backend.distinct_modes(spec)},
            **({"unavailable": unavailable} if unavailable else {})}
    if costs:
        info["first_round_s"] = costs  # per candidate: build, warm-up and first round
    if budget_s is not None and math.isfinite(budget_s):
        info["budget_s"] = budget_s
    if skipped:
        info["untried"] = {mode: "the probe's budget (the training is shorter than trying it would take)"
                           for mode in skipped}
    return chosen, model, info


def time_round(backend: Backend, model: Any, train: Any, order: np.ndarray, bs: int) -> float:
    """One probe round of a mode: chunks of `order` until PROBE_ROUND_S seconds; returns samples/s."""
    samples, seconds = 0, 0.0
    # Replica processes must make the same number of train_epoch calls (each is collective):
    # rank 0's clock decides when the round ends.
    while backend.rank0_value(seconds < PROBE_ROUND_S):
        backend.synchronize()
        t0 = clock()
        backend.train_epoch(model, train, order, bs)
        backend.synchronize()
        seconds += clock() - t0
        samples += len(order)
    return samples / seconds


def faster(best: dict[str, float | None], *, candidates: tuple[str, ...]) -> str:
    """The candidate with the higher best rate; TIE_CHOICE when the rates are within TIE of each other."""
    top = max(candidates, key=lambda mode: best[mode] or 0.0)
    rates = sorted(best[mode] or 0.0 for mode in candidates)
    tied = len(rates) > 1 and rates[-1] < TIE * rates[-2]
    return TIE_CHOICE if tied and TIE_CHOICE in candidates else top


def clear_winner(best: dict[str, float | None]) -> bool:
    """Whether one timed mode is CLEAR_WIN times faster than every other timed one."""
    rates = sorted(r for r in best.values() if r)
    return len(rates) > 1 and rates[-1] >= CLEAR_WIN * rates[-2]
