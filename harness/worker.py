"""Runs one cell (task x backend x repeat) in its own process and writes one JSON record."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.cell_config import CellConfig
    from harness.replicas import ReplicaProcesses

PROGRESS_PREFIX = "@@tribench "
# Test-only fault injection, read here and nowhere else: "<fault>[@<task>/<backend>[/<repeat>]]".
# Faults: raise, segfault, oom (SIGKILL, as the kernel's OOM killer sends), hang, nan.
# Honoured only with TESTING_ENV=1 (tests/conftest.py sets it), so a stray variable in a
# user's shell cannot fail real runs; a fault used is announced and lands in the record.
FAULT_ENV = "TRIBENCH_FAULT"
TESTING_ENV = "TRIBENCH_TESTING"
# With replica processes, the rank whose process takes the fault (default 0, the reporting one).
FAULT_RANK_ENV = "TRIBENCH_FAULT_RANK"
# After rank 0's part, how long the other replica processes get to exit on their own.
REPLICA_EXIT_S = 60.0
# A cell config holds a task spec and a few paths: far less than this.
MAX_CONFIG_BYTES = 16 << 20
# How this process started (env.worker_start): a fresh interpreter, or forked from a zygote that had
# imported the framework already (harness.forkserver), which then says how long that import took.
WORKER_START: dict = {"how": "spawn"}


def emit(event: dict) -> None:
    """A progress event for the runner, on stderr so stdout stays free for frameworks."""
    sys.stderr.write(PROGRESS_PREFIX + json.dumps(event) + "\n")
    sys.stderr.flush()


def injected_fault(task: str, backend: str, repeat: int, rank: int = 0) -> str | None:
    if os.environ.get(TESTING_ENV) != "1" or os.environ.get(FAULT_RANK_ENV, "0") != str(rank):
        return None
    fault, _, target = os.environ.get(FAULT_ENV, "").partition("@")
    return fault if fault and target in ("", f"{task}/{backend}", f"{task}/{backend}/{repeat}") else None


def apply_fault(fault: str | None, data) -> None:
    if fault == "raise":
        raise RuntimeError("injected fault")
    if fault == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if fault == "oom":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":
        time.sleep(10**6)
    if fault == "nan":  # poison every training sample: the loss turns NaN at the first step
        data.x_train = data.x_train.copy()
        data.x_train[:] = float("nan")


def run_cell(cfg: CellConfig, record: dict) -> dict:
    """Fill `record` from a config written by the runner; what is filled survives an exception."""
    from harness import load

    started, load_start = time.perf_counter(), load.snapshot()
    from backends import get_backend
    from backends.base import BEST, BackendUnavailable, Replicas
    from harness import data as data_mod
    from harness.checkpoint import load_checkpoint_for
    from harness.loop import Diverged, flatten_metrics, run_stages
    from harness.measure import RssSampler, max_rss_mb, roofline_peak, rss_mb
    from harness.mode_cache import ModeCache, folder_from_env
    from harness.replicas import replica_threads
    from harness.results import host_environment
    from harness.tokens import tokenizer_file
    from tasks.targets import for_dataset
    from tasks.taskfile import spec_from_dict

    # The runner sends the whole spec, so a task from a file needs no file here; it is built
    # for the dataset the runner resolved: its input shape and its (task, dataset) target.
    spec = for_dataset(spec_from_dict(cfg.task_spec), cfg.data).with_overrides(**cfg.overrides, seed=cfg.seed)
    record["spec"] = spec.to_dict()
    record["objective"] = spec.objective
    # env.mode is the mode trained in: under --mode best it is known once the probe has chosen,
    # or given by the runner (pinned_mode) from the cell's first repeat.
    pinned = cfg.pinned_mode
    forced = cfg.mode if cfg.mode != BEST else None
    replicas = Replicas(cfg.data_parallel, cfg.rank, cfg.address)
    record["env"] = {**host_environment(Path(cfg.out)), "mode": forced, "mode_requested": cfg.mode,
                     "mode_source": "forced" if forced else "pinned" if pinned else "probe",
                     "precision": cfg.precision, "device_requested": cfg.device, "threads": cfg.threads,
                     "data_parallel": replicas.count, "per_replica_batch": spec.batch_size // replicas.count,
                     "worker_start": dict(WORKER_START)}
    # A Hugging Face folder's tokenizer.json tokenizes the text its model is finetuned on.
    tokenizer = tokenizer_file(cfg.init_from) if spec.takes_tokens else None
    phases = {"data_s": time.perf_counter()}  # the fixed costs around training, for docs/modes.md's profile
    dataset = data_mod.load(spec, cfg.data, folder=cfg.data_folder, seed=cfg.data_seed,
                            subset=cfg.subset, tokenizer=tokenizer)
    record["data"] = dataset.describe()
    stage_data = {s.name: data_mod.load_stage(spec, s.data, run_source=cfg.data, seed=cfg.data_seed,
                                              subset=cfg.subset, tokenizer=tokenizer)
                  for s in spec.stages if s.data}
    if stage_data:
        record["data"]["stages"] = {name: d.describe() for name, d in stage_data.items()}
    phases["data_s"] = time.perf_counter() - phases["data_s"]
    fault = injected_fault(cfg.task, cfg.backend, cfg.repeat, replicas.rank)
    if fault:
        emit({"event": "fault", "fault": fault})  # the runner records it, also when the fault kills us
    apply_fault(fault, dataset)

    phases["import_s"] = time.perf_counter()
    backend = get_backend(cfg.backend)
    threads = cfg.threads
    if backend.REPLICA_PROCESSES and replicas.count > 1:
        threads = replica_threads(threads, replicas.count)  # the cell's budget, shared by its processes
    try:
        backend.configure(device=cfg.device, threads=threads, precision=cfg.precision, replicas=replicas)
    except BackendUnavailable as exc:
        record.update(status="skipped", error=str(exc))
        return record
    record["memory"]["rss_after_import_mb"] = rss_mb()
    phases["import_s"] = time.perf_counter() - phases["import_s"]
    record["env"].update(backend.environment())
    # On a GPU the CPU's matmul peak says nothing: the roofline divides by the device's.
    peak, peak_source = roofline_peak(record["env"])
    if peak and record["env"].get("device") == "gpu" and replicas.count > 1:
        peak, peak_source = peak * replicas.count, f"{peak_source} x {replicas.count} replica devices"
    record["env"]["matmul_peak_gflops"] = peak
    record["env"]["peak_source"] = peak_source

    init_from = load_checkpoint_for(Path(cfg.init_from), spec, seed=cfg.seed) if cfg.init_from else None
    prefix = cfg.checkpoint_prefix
    # Replica processes decide together in the probe: a decision read by one alone would split them.
    cache_folder = folder_from_env() if cfg.mode == BEST and not pinned and replicas.count == 1 else None
    with RssSampler() as sampler:
        try:
            results = run_stages(backend, spec, dataset, seed=cfg.seed, mode=pinned or cfg.mode,
                                 init_from=init_from,
                                 checkpoint_prefix=Path(prefix) if prefix else None, progress=emit,
                                 stage_data=stage_data,
                                 mode_cache=ModeCache(cache_folder, record["env"]) if cache_folder else None,
                                 quick=cfg.quick)
            record["metrics"] = flatten_metrics(spec, results, peak_gflops=peak)
            record["env"]["mode"] = record["metrics"].pop("mode")
            record["env"]["execution"] = record["metrics"].pop("execution")
            if (record["metrics"].get("mode_probe") or {}).get("cached_at"):
                record["env"]["mode_source"] = "cache"
            record["status"] = "ok"
            if cfg.export:
                record["exported"] = export_trained(backend, spec, results[spec.primary_stage], dataset=dataset,
                                                    cfg=cfg, mode=record["env"]["mode"])
        except BackendUnavailable as exc:  # the mode asked for cannot run this model here
            record.update(status="skipped", error=str(exc))
        except Diverged as exc:
            record.update(status="diverged", error=str(exc))
            record["failure"] = {"reason": "diverged", "stage": exc.stage, "epoch": exc.epoch, "step": exc.step}
    record["env"]["load"] = load.summary(load_start, load.snapshot())
    record["memory"]["peak_rss_mb"] = max(sampler.peak_mb, max_rss_mb())
    record["memory"].update(backend.memory())
    record["metrics"]["wall_s"] = time.perf_counter() - started
    record["metrics"].update(phases)
    record["metrics"]["cpu_s"] = time.process_time()  # this process's CPU seconds, all threads: wall_s without the load
    return record


def export_trained(backend, spec, result, *, dataset, cfg: CellConfig, mode: str) -> dict:
    """The primary stage's trained weights in each --export format, under the results folder's exports/."""
    from harness.exporting import export_figures

    m = result.metrics
    model = backend.build(spec, result.weights, trainable=None, mode=mode)
    folder = Path(cfg.out) / "exports" / f"{cfg.task}-{cfg.backend}-r{cfg.repeat}"
    return export_figures(backend, model, dataset.x_test, formats=list(cfg.export), folder=folder,
                          batch_size=spec.eval_batch_size,
                          train_s=m["warmup_s"] + sum(m["epoch_s"]) + sum(m["eval_s"]))


def main(argv: list[str] | None = None, *, parent_pid: int | None = None) -> int:
    """`parent_pid`: the process to die with instead of the config's driver (a forked worker's zygote)."""
    parser = argparse.ArgumentParser(prog="python -m harness.worker", description=__doc__)
    parser.add_argument("config", type=Path, help="cell config JSON written by the runner")
    parser.add_argument("record", type=Path, help="where to write the record JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from harness.cell_config import CellConfig
    from harness.confine import UntrustedInput, read_bytes

    try:
        cfg = CellConfig.from_json(read_bytes(args.config, limit=MAX_CONFIG_BYTES), str(args.config))
    except (OSError, UntrustedInput) as exc:
        sys.stderr.write(f"{parser.prog}: {exc}\n")
        return 2
    if cfg.driver_pid is not None:
        from harness.lifeline import tie_to_driver

        tie_to_driver(parent_pid or cfg.driver_pid, Path(cfg.cell_dir) if cfg.cell_dir else None)
    from harness.results import empty_record, utc_now, write_json_atomic

    record = empty_record(task=cfg.task, backend=cfg.backend, repeat=cfg.repeat, seed=cfg.seed)
    record["started_at"] = utc_now()
    written = threading.Lock()  # one record write: rank 0's own, or the replica watcher's

    def write_record(failure: dict | None = None) -> None:
        with written:
            final = record
            if failure:  # from the watcher thread, while the main thread may still be filling `record`
                try:
                    final = copy.deepcopy(record)
                except RuntimeError:  # changed while copied: what is certain is enough
                    final = empty_record(task=cfg.task, backend=cfg.backend, repeat=cfg.repeat, seed=cfg.seed)
                final.update(status="failed", error=failure.pop("error"), failure=failure)
            final["finished_at"] = utc_now()
            write_json_atomic(args.record, final)

    cfg, replicas = start_replicas(cfg, args.record.parent, write_record)
    code = 0
    try:
        run_cell(cfg, record)
    except Exception as exc:  # the record says what broke; the runner adds the stderr tail
        traceback.print_exc()
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      failure={"reason": "exception", "exception": type(exc).__name__})
        code = 1
    if replicas is not None:
        # After a failure here the others may wait in a collective for rank 0: no grace then.
        failed = replicas.finish(REPLICA_EXIT_S if code == 0 else 0.0)
        if failed and code == 0:
            rank, error = min(failed.items())
            record.update(status="failed", error=f"replica rank {rank} failed: {error}",
                          failure={"reason": "replica", "rank": rank})
            code = 1
    write_record()
    return code


def start_replicas(cfg: CellConfig, folder: Path, write_record) -> tuple[CellConfig, ReplicaProcesses | None]:
    """Ranks 1..N-1 for a backend whose replicas are processes, started from rank 0, with rank 0's config
    now holding their meeting address; (cfg, None) otherwise.

    A replica that dies leaves rank 0 waiting in a collective: the watcher then writes
    the record with the failing rank and its error, ends the others and exits.
    """
    if cfg.data_parallel == 1 or cfg.rank != 0:
        return cfg, None
    from backends import get_backend

    if not get_backend(cfg.backend).REPLICA_PROCESSES:  # the adapter module only, not its framework
        return cfg, None
    from harness.replicas import ReplicaProcesses, free_address

    cfg = dataclasses.replace(cfg, address=free_address())

    def on_failure(rank: int, error: str) -> None:
        emit({"event": "replica_failed", "rank": rank, "error": error})
        try:
            write_record({"error": f"replica rank {rank} failed: {error}", "reason": "replica", "rank": rank})
        finally:
            group.stop()
            os._exit(1)

    group = ReplicaProcesses(cfg, folder, on_failure)
    group.start()
    return cfg, group


if __name__ == "__main__":
    sys.exit(main())
