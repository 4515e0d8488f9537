"""Realistic fake records following results/README.md (schema_version 1), for report and compare tests."""

from __future__ import annotations

import json
import math
import random
import zlib
from pathlib import Path

# Per backend: a rough speed factor and framework version, so runs look like real ones.
BACKENDS = {
    "torch": (1.00, "2.3.1"),
    "tensorflow": (0.85, "2.16.1"),
    "jax": (1.20, "0.4.30"),
}
TASK_DATA = {
    "mnist-mlp": ("mnist", 60000, 10000, 0.97, 101770, 101770),
    "cifar-cnn": ("cifar10", 50000, 10000, 0.70, 122570, 122570),
    "finetune": ("cifar10", 25000, 5000, 0.70, 122365, 65925),
    "tiny-gpt": ("fortunes", 18112, 2000, 0.5, 875520, 875520),
}
# Tasks judged by held-out loss (lower is better): their target loss, as their spec carries it.
LOSS_TARGETS = {"tiny-gpt": 1.6, "tiny-gpt-finetune": 1.6}  # as the tasks set target_loss


def make_record(task: str = "mnist-mlp", backend: str = "torch", repeat: int = 0, *,
                status: str = "ok", synthetic: bool = False, device: str = "cpu", gpu_name: str | None = None,
                epochs: int = 3, seed: int = 0, throughput: float = 20000.0, accuracy: float = 0.975,
                jitter: float = 0.0, rng_seed: int | None = None, roofline: bool = False,
                mode: str | None = "compiled", test_loss: float | None = None) -> dict:
    """One record of one cell. `jitter` is the relative noise on timings, drawn from `rng_seed`.

    A task of LOSS_TARGETS gets a language model's record: a held-out-loss curve falling from
    ln 256 to `test_loss` (default 1.5), bits per byte, tokens/s and the spec's target_loss.
    """
    cell_seed = zlib.crc32(f"{task}/{backend}/{repeat}/{device}".encode())  # stable across processes, unlike hash()
    rng = random.Random(rng_seed if rng_seed is not None else cell_seed)
    factor, version = BACKENDS.get(backend, (1.0, "1.0"))
    name, n_train, n_test, target, p_total, p_train = TASK_DATA.get(task, ("mnist", 60000, 10000, 0.97, 1000, 1000))
    if synthetic:
        n_train, n_test = 2048, 512
    gpu = device != "cpu"
    env = {
        "framework": backend, "framework_version": version, "device": device, "threads": 2,
        "precision": "fp32", "python": "3.11.9", "numpy_version": "1.26.4",
        "platform": "Linux-6.1.0-x86_64-with-glibc2.36", "machine": "x86_64",
        "cpu": "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "cpu_count": 2, "hostname": "bench-1",
        "git_commit": "8fbc28b0c0ffee0123456789abcdef0123456789", "git_dirty": False,
        "matmul_peak_gflops": 120.0,
    }
    if mode is not None:
        env["mode"] = mode
    if gpu:
        env["device_name"] = gpu_name or "NVIDIA H100 80GB HBM3"
    record = {
        "schema_version": 1, "task": task, "objective": "loss" if task in LOSS_TARGETS else "accuracy",
        "backend": backend, "repeat": repeat, "seed": seed,
        "status": status, "error": None, "failure": None,
        "data": {"name": name, "source": "synthetic" if synthetic else f"/usr/share/datasets/{name}",
                 "synthetic": synthetic, "n_train": n_train, "n_test": n_test, "subset": None},
        "metrics": {}, "memory": {}, "env": env,
        "spec": {"name": task, "target_accuracy": target, "epochs": epochs, "target_loss": LOSS_TARGETS.get(task)},
        "started_at": "2024-06-01T12:00:00Z", "finished_at": "2024-06-01T12:01:00Z",
    }
    if status == "skipped":
        record["error"] = f"backend {backend!r} is not installed: pip install 'tribench[{backend}]'"
        record["env"] = {"framework": backend}
        record["data"] = None
        return record
    if status in ("failed", "diverged"):
        record["error"] = ("loss became nan at epoch 2 step 17" if status == "diverged"
                           else "RuntimeError: worker exited with signal 9 (out of memory?)")
        record["failure"] = {"reason": record["error"], "exit_code": -9 if status == "failed" else 0,
                             "signal": 9 if status == "failed" else None, "stderr_tail": "Traceback ...",
                             "stage": "train", "epoch": 2, "step": 17}
        return record

    def noisy(v: float) -> float:
        return v * (1.0 + jitter * rng.uniform(-1, 1))

    sps = noisy(throughput * factor)
    epoch_s = [n_train / noisy(sps) for _ in range(epochs)]
    cumulative = [sum(epoch_s[: i + 1]) for i in range(epochs)]
    initial_loss = math.log(10) + 0.0123  # identical weights: identical initial loss on every backend
    acc_noise = 0.002 * rng.uniform(-1, 1) if jitter else 0.0
    # Approaches `accuracy` geometrically and ends on it, like a real training curve.
    gaps = [(accuracy - 0.5) * 0.3 ** (i + 1) for i in range(epochs)]
    epoch_acc = [min(0.999, accuracy - g + gaps[-1] + acc_noise) for g in gaps]
    epoch_loss = [1.6 * 0.45 ** i + 0.05 for i in range(epochs)]
    reached = [t for t, a in zip(cumulative, epoch_acc) if a >= target]
    record["metrics"] = {
        "test_accuracy": epoch_acc[-1], "test_loss": 0.08,
        "initial_test_loss": initial_loss, "initial_test_accuracy": 0.0982,
        "epoch_test_accuracy": epoch_acc, "epoch_train_loss": epoch_loss, "epoch_s": epoch_s,
        "epoch_train_time_s": cumulative,
        "time_to_target_s": reached[0] if reached else None,
        "train_samples_per_s": sps, "eval_samples_per_s": noisy(sps * 4), "warmup_s": noisy(1.5 / factor),
        "wall_s": sum(epoch_s) + 8.0, "params_total": p_total, "params_trainable": p_train,
        "train_flops_per_sample": 610000,
    }
    if task in LOSS_TARGETS:
        final = 1.5 if test_loss is None else test_loss
        # From ln 256 (uniform guesses) towards `final`, ending on it.
        curve = [final + (math.log(256) - final) * 0.4 ** (i + 1) - (math.log(256) - final) * 0.4 ** epochs
                 for i in range(epochs)]
        reached_loss = [t for t, v in zip(cumulative, curve) if v <= LOSS_TARGETS[task]]
        record["metrics"].update(
            initial_test_loss=math.log(256) + 0.11, epoch_test_loss=curve, test_loss=curve[-1],
            bits_per_byte=curve[-1] / math.log(2), target_loss=LOSS_TARGETS[task], context=128,
            time_to_target_s=reached_loss[0] if reached_loss else None,
            train_tokens_per_s=sps * 128, eval_tokens_per_s=sps * 4 * 128)
    if roofline:
        record["metrics"]["roofline_fraction"] = noisy(0.12)
    if task == "finetune":
        record["metrics"].update({
            "finetuned_accuracy": min(0.999, accuracy + 0.05), "scratch_accuracy": accuracy - 0.1,
            "frozen_train_samples_per_s": sps * 1.8, "full_train_samples_per_s": sps,
        })
    record["memory"] = {"rss_after_import_mb": 250.0 + 150 * factor, "peak_rss_mb": noisy(900.0 * factor),
                        "device_peak_mb": noisy(1200.0 * factor) if gpu else None}
    return record


def make_run(tasks=("mnist-mlp",), backends=("torch", "jax"), repeats: int = 1, **kwargs) -> list[dict]:
    """Every cell of a task x backend x repeat matrix; kwargs go to make_record."""
    return [make_record(t, b, r, **kwargs) for t in tasks for b in backends for r in range(repeats)]


def write_run(run_dir: Path, records: list[dict]) -> Path:
    """records.jsonl in `run_dir` (created), one sorted-key line per record."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "records.jsonl"
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
    return run_dir
