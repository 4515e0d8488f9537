"""Optimizers, learning-rate schedules and gradient clipping, each in one pinned formulation.

Every update below is what each adapter must compute, step s = 0, 1, 2, ... with
lr_s = optimizer.lr * schedule.factor(s) and g the (clipped) gradient:

- Clipping by global norm: g *= min(1, clip_norm / ||g||), ||g|| over every trainable
  array (optax's form; torch's clip_grad_norm_ adds 1e-6 to the norm, its adapter does not).
- Adam: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= lr_s m_hat / (sqrt(v_hat) + eps)
  (Kingma & Ba's Algorithm 1, as torch and optax; Keras puts eps before bias correction).
- AdamW: p -= lr_s * weight_decay * p, then the Adam step (decay decoupled from the
  gradient and multiplied by the learning rate, as torch and optax; `decay` says which
  arrays: every trainable one by default, biases and norms included, or "matrices", or
  names). Defaults differ (torch 0.01, Keras 0.004, optax 1e-4); the spec's default is 0,
  so a task states its decay.
- SGD: buf = momentum buf + g (buf starts at 0); p -= lr_s (g + momentum buf) with
  nesterov, else p -= lr_s buf (torch's and optax's form; Keras keeps lr inside the
  velocity, v = momentum v - lr g, which differs once the learning rate changes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tasks.layers import require

# Where Adam's epsilon sits: one formulation is allowed so that no backend can silently run another.
EPSILON_PLACEMENTS = ("sqrt_v_hat",)


@dataclass(frozen=True)
class Constant:
    kind: str = field(default="constant", init=False)

    def factor(self, step: int) -> float:
        return 1.0

    def sized(self, total_steps: int) -> Constant:
        return self


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up to the full rate over warmup_steps, then cosine decay to 0 at total_steps.

    factor(s) = (s + 1) / warmup_steps for s < warmup_steps, else
    0.5 (1 + cos(pi min(s - warmup_steps, decay) / decay)), decay = total_steps - warmup_steps.

    total_steps None (the default): the run sizes it, epochs x the steps per epoch of the
    data a stage actually trains on (`sized`), so the cosine ends with the last step
    whatever --epochs, --quick or --data-dir say; warmup_steps None: warmup_fraction of it.
    """

    warmup_steps: int | None = None
    total_steps: int | None = None
    warmup_fraction: float = 0.05
    kind: str = field(default="warmup_cosine", init=False)

    def __post_init__(self):
        require(self.warmup_steps is None or isinstance(self.warmup_steps, int) and self.warmup_steps >= 1,
                f"schedule: warmup_steps must be an int >= 1, got {self.warmup_steps!r}")
        require(self.total_steps is None or isinstance(self.total_steps, int)
                and self.total_steps > (self.warmup_steps or 0),
                f"schedule: total_steps must be an int above warmup_steps, got {self.total_steps!r}")
        require(isinstance(self.warmup_fraction, (int, float)) and 0 <= self.warmup_fraction < 1,
                f"schedule: warmup_fraction must lie in [0, 1), got {self.warmup_fraction!r}")

    def sized(self, total_steps: int) -> WarmupCosine:
        """This schedule with its open lengths filled in for a run of total_steps (fixed ones are kept)."""
        total = self.total_steps or max(total_steps, (self.warmup_steps or 1) + 1)
        warmup = self.warmup_steps or min(max(1, int(total * self.warmup_fraction)), total - 1)
        return WarmupCosine(warmup_steps=warmup, total_steps=total, warmup_fraction=self.warmup_fraction)

    def factor(self, step: int) -> float:
        require(self.total_steps is not None and self.warmup_steps is not None,
                "schedule: warmup_cosine is not sized for a run yet (TaskSpec.sized_for)")
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay = self.total_steps - self.warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * min(step - self.warmup_steps, decay) / decay))


Schedule = Constant | WarmupCosine
SCHEDULES = {"constant": Constant, "warmup_cosine": WarmupCosine}


class _Common:
    def _check_common(self):
        name = type(self).__name__
        require(isinstance(self.lr, (int, float)) and self.lr > 0, f"{name} lr must be positive, got {self.lr}")
        require(self.clip_norm is None or self.clip_norm > 0, f"{name} clip_norm must be positive or absent")
        require(isinstance(self.schedule, tuple(SCHEDULES.values())), f"{name} schedule must be one of "
                f"{', '.join(SCHEDULES)}")

    def lr_at(self, step: int) -> float:
        return self.lr * self.schedule.factor(step)

    def lr_table(self) -> list[float]:
        """lr_at(s) for s = 0 .. len - 1; the last entry holds for every later step.

        Adapters index this table (clamped) instead of re-writing the schedule's formula.
        """
        require(not isinstance(self.schedule, WarmupCosine) or self.schedule.total_steps is not None,
                "the warmup_cosine schedule has no length yet: size the spec for its data first (TaskSpec.sized_for)")
        steps = self.schedule.total_steps + 1 if isinstance(self.schedule, WarmupCosine) else 1
        return [self.lr_at(s) for s in range(steps)]


@dataclass(frozen=True)
class Adam(_Common):
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-7
    epsilon_placement: str = "sqrt_v_hat"
    schedule: Schedule = Constant()
    clip_norm: float | None = None
    kind: str = field(default="adam", init=False)

    def __post_init__(self):
        self._check_common()
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "Adam betas must lie in [0, 1)")
        require(self.eps > 0, f"Adam eps must be positive, got {self.eps}")
        require(self.epsilon_placement in EPSILON_PLACEMENTS,
                f"unknown epsilon_placement {self.epsilon_placement!r}; valid: {', '.join(EPSILON_PLACEMENTS)}")


DECAY_RULES = ("all", "matrices")


@dataclass(frozen=True)
class AdamW(Adam):
    weight_decay: float = 0.0
    # Which trainable arrays decay: "all"; "matrices", the weight matrices (kernels, embedding
    # tables, LoRA adapters: 2-D or more, biases excluded, as an attention bias's canonical
    # (heads, head_dim) is a vector), GPT-2's and nanoGPT's groups; or the layer and
    # `<layer>.<param>` names listed.
    decay: str | tuple[str, ...] = "all"
    kind: str = field(default="adamw", init=False)

    def __post_init__(self):
        super().__post_init__()
        require(self.weight_decay >= 0, f"AdamW weight_decay must be >= 0, got {self.weight_decay}")
        require(self.decay in DECAY_RULES or isinstance(self.decay, tuple) and all(isinstance(n, str)
                                                                                    for n in self.decay),
                f"AdamW decay must be one of {', '.join(DECAY_RULES)} or a list of names, got {self.decay!r}")

    def decays(self, name: str, layer: str, shape: tuple[int, ...]) -> bool:
        """Whether the trainable array `name` (of `layer`, this shape) decays."""
        if self.decay == "all":
            return True
        if self.decay == "matrices":
            return len(shape) >= 2 and not name.endswith("bias")
        return layer in self.decay or name in self.decay


@dataclass(frozen=True)
class SGD(_Common):
    lr: float = 1e-2
    momentum: float = 0.0
    nesterov: bool = False
    schedule: Schedule = Constant()
    clip_norm: float | None = None
    kind: str = field(default="sgd", init=False)

    def __post_init__(self):
        self._check_common()
        require(0 <= self.momentum < 1, f"SGD momentum must lie in [0, 1), got {self.momentum}")
        require(not self.nesterov or self.momentum > 0, "SGD nesterov needs a momentum above 0")


Optimizer = Adam | AdamW | SGD
OPTIMIZERS = {"adam": Adam, "adamw": AdamW, "sgd": SGD}
