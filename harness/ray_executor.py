"""--executor ray: each cell one Ray task, running the same worker subprocess as the local executor."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

from harness import confine
from harness import data as data_mod
from harness.cell_config import CellConfig
from harness.cells import Cell, cell_config
from harness.checkpoint import SUFFIX as CHECKPOINT_SUFFIX
from harness.errors import Interrupted, UsageError
from harness.executor import missing_backend_record, run_worker, skipped_record, stop_process
from harness.lifeline import CELL_DIR_PREFIX
from harness.node import describe_node
from harness.results import empty_record, utc_now
from harness.run_config import RunConfig, available_cores
from harness.storage import write_atomic

INSTALL_HINT = 'pip install "tribench[ray]"'
# A cell whose process or node died is run once more, then recorded as failed.
MAX_RETRIES = 1
# Deaths that come from outside the cell (the OOM killer, a preempting scheduler, a node
# going down) and may not happen again; a segfault or an exception would, so they are not retried.
RETRY_SIGNALS = ("SIGKILL", "SIGTERM")
# Driver environment the cells see on every node: TRIBENCH_* settings (data folder, test faults).
FORWARDED_ENV_PREFIX = "TRIBENCH_"
# Long enough for a cancelled task to stop its worker (stop_process: SIGTERM, 5 s, SIGKILL).
CANCEL_GRACE_S = 10.0


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


class CellProcessKilled(Exception):
    """Raised inside the Ray task so that Ray retries a cell whose worker was killed from outside."""

    def __init__(self, record: dict):
        super().__init__(record.get("error"))
        self.record = record

    def __reduce__(self):  # Ray pickles the exception back to the driver: keep the record
        return CellProcessKilled, (self.record,)


def _attempt() -> int | None:
    """1 for the first run of a Ray task, 2 for its retry.

    Ray has no public call for this; the core worker's getter is read defensively and the
    record says None if it is gone.
    """
    import ray

    try:
        return ray._private.worker.global_worker.core_worker.get_current_task_attempt_number() + 1
    except AttributeError:
        return None


def _node_here() -> dict:
    import ray

    context = ray.get_runtime_context()
    return describe_node(executor="ray", node_id=context.get_node_id(), attempt=_attempt(),
                         resources=context.get_assigned_resources(),
                         gpu_ids=[str(g) for g in context.get_accelerator_ids().get("GPU", [])])


def localise_data(cell_cfg: CellConfig, *, allow_download: bool) -> CellConfig:
    """The driver's real-data folder, or this node's own copy of the same dataset when the path is not here."""
    folder = cell_cfg.data_folder
    # A corpus may be a single file, so the driver's path counts if anything is there.
    if folder is None or Path(folder).exists():
        return cell_cfg
    from tasks.taskfile import spec_from_dict

    accepted = data_mod.accepted_for(spec_from_dict(cell_cfg.task_spec))
    # Checksums are verified when the worker loads it, so another copy is the same data.
    _, here, _ = data_mod.resolve(accepted, cell_cfg.data, allow_download=allow_download)
    return dataclasses.replace(cell_cfg, data_folder=str(here))


def run_cell_task(cell_cfg: CellConfig, *, timeout: float | None, threads: int, init_from: bytes | None,
                  allow_download: bool) -> tuple:
    """The body of one Ray task, on whichever node Ray chose: (record, {checkpoint name: bytes}).

    Paths in the cell config are the driver's; the worker gets node-local ones, and the
    checkpoints it writes travel back to the driver with the record.
    """
    node = _node_here()
    cell_cfg = localise_data(cell_cfg, allow_download=allow_download)
    with tempfile.TemporaryDirectory(prefix=CELL_DIR_PREFIX) as tmp:
        tmp = Path(tmp)
        prefix = Path(cell_cfg.checkpoint_prefix).name
        cell_cfg = dataclasses.replace(cell_cfg, checkpoint_prefix=str(tmp / "checkpoints" / prefix))
        if init_from is not None:
            (tmp / "init-from").write_bytes(init_from)  # read by its content: safetensors or npz
            cell_cfg = dataclasses.replace(cell_cfg, init_from=str(tmp / "init-from"))
        state: dict = {"proc": None}
        try:
            record = run_worker(cell_cfg, tmp, timeout=timeout, threads=threads, on_event=lambda event: None,
                                state=state)
        except BaseException:
            # ray.cancel raises KeyboardInterrupt here and a dying Ray worker SystemExit: the
            # worker runs in its own session, so it must be stopped by hand or it runs on.
            if state.get("proc") is not None:
                stop_process(state["proc"])
            raise
        record["node"] = node
        checkpoints = {p.name: p.read_bytes() for p in sorted((tmp / "checkpoints").glob(f"*{CHECKPOINT_SUFFIX}"))}
    if (record.get("failure") or {}).get("signal") in RETRY_SIGNALS:
        raise CellProcessKilled(record)
    return record, checkpoints


def ray_failure_record(cell_cfg: CellConfig, exc: Exception) -> dict:
    """The record of a cell that Ray gave up on after MAX_RETRIES retries."""
    import ray

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else None
    if isinstance(cause, CellProcessKilled):
        record = cause.record
    else:
        # The task itself died (its Ray worker or node): only the exception says what happened.
        record = empty_record(task=cell_cfg.task, backend=cell_cfg.backend, repeat=cell_cfg.repeat,
                              seed=cell_cfg.seed)
        message = str(exc).strip()
        # Ray's messages run to several sentences of advice: the record's error keeps the first.
        first = (message.splitlines() or [""])[0].split(". ")[0]
        record.update(status="failed", finished_at=utc_now(), error=f"Ray: {type(exc).__name__}: {first}",
                      failure={"reason": "ray", "exception": type(exc).__name__, "message": message})
    record["failure"] = {**(record.get("failure") or {}), "attempts": MAX_RETRIES + 1}
    record["error"] = f"{record['error']} (after {MAX_RETRIES} retry)"
    return record


class RayExecutor:
    """The Executor (harness.executor) whose cells are Ray tasks: on a local Ray instance started for the run,
    or on the cluster at `address`."""

    name = "ray"

    def __init__(self, address: str | None = None):
        if not ray_installed():
            raise UsageError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}")
        self.address = address
        self.pending: dict = {}
        self.connected = False

    def start(self, cfg: RunConfig) -> None:
        try:
            if self.address:
                _probe(self.address)  # before Ray is imported: its handlers would keep SIGTERM from ending it
        except OSError as exc:
            raise UsageError(f"--ray-address {self.address}: cannot join that Ray cluster ({exc})") from None
        import ray

        try:
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                # A private instance for this run, sized like the local executor's machine.
                ray.init(num_cpus=max(cfg.threads, available_cores()), include_dashboard=False,
                         log_to_driver=False)
        except (OSError, RuntimeError, ValueError) as exc:
            what = f"--ray-address {self.address}: cannot join that Ray cluster" if self.address else \
                "cannot start a local Ray instance"
            raise UsageError(f"{what} ({(str(exc).strip().splitlines() or [''])[0]})") from None
        self.connected = True
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if cfg.threads > largest:
            self.close()  # the runner calls close() only for an executor that started
            raise UsageError(f"--threads {cfg.threads}: no node of the Ray cluster has that many CPUs "
                             f"(largest: {largest:g}); pass --threads {int(largest)} or less")

    def run(self, cfg: RunConfig, cells: list[Cell], sources: dict, *, bar, on_record) -> None:
        import ray

        gpus = self._gpus_per_cell(cfg)
        task = ray.remote(run_cell_task).options(
            num_cpus=cfg.threads, num_gpus=gpus, max_retries=MAX_RETRIES, retry_exceptions=[CellProcessKilled],
            runtime_env=_runtime_env(), name="tribench-cell")
        # Stored once in Ray's object store; Ray hands each task the bytes, not the reference.
        init_from = ray.put(Path(cfg.init_from).read_bytes()) if cfg.init_from else None
        configs = {}
        for cell in cells:
            skipped = missing_backend_record(cfg, cell)
            if skipped is None and cfg.device == "gpu" and not gpus:
                skipped = skipped_record(cell, cfg.seed + cell.repeat, "--device gpu: the Ray cluster has no GPU")
            if skipped is not None:
                on_record(cell, skipped)
                continue
            configs[cell.key] = cell_config(cfg, cell, sources[cell.task])
            ref = task.remote(configs[cell.key], timeout=cfg.timeout, threads=cfg.threads, init_from=init_from,
                              allow_download=cfg.allow_download)
            self.pending[ref] = cell
        bar.start_cell(f"Ray: {len(self.pending)} cells queued, {cfg.threads} CPUs and {gpus} GPUs each")
        with _signals_between_waits() as received:
            while self.pending:
                # One second at most: `received` is looked at between waits.
                ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    cell = self.pending.pop(ref)
                    try:
                        record, checkpoints = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        record, checkpoints = ray_failure_record(configs[cell.key], exc), {}
                    _save_checkpoints(cfg.out, checkpoints)
                    on_record(cell, record)
                if received:
                    raise Interrupted(received[0])

    def stop(self) -> None:
        """Cancel every cell not finished; their tasks stop their workers (run_cell_task)."""
        import ray

        for ref in self.pending:
            ray.cancel(ref)
        deadline = time.monotonic() + CANCEL_GRACE_S
        while self.pending and time.monotonic() < deadline:
            ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=1.0)
            for ref in ready:
                self.pending.pop(ref)
        self.pending.clear()

    def close(self) -> None:
        import ray

        if self.connected:
            ray.shutdown()  # stops the private instance; only disconnects from a cluster we joined
            self.connected = False

    @staticmethod
    def _gpus_per_cell(cfg: RunConfig) -> int:
        """Whole GPUs per GPU cell (one per data-parallel replica), so no two cells share one; --device auto
        uses GPUs where the cluster has them."""
        import ray

        if cfg.device == "cpu":
            return 0
        return cfg.data_parallel if ray.cluster_resources().get("GPU", 0) >= 1 else 0


@contextlib.contextmanager
def _signals_between_waits():
    """Note SIGINT/SIGTERM; the loop raises Interrupted once ray.wait has returned.

    The runner's handler raises at once, and an exception raised inside Ray's compiled
    wait() comes out as a SystemError, so here the handler only writes the signal down.
    """
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# The start of an HTTP/2 connection (gRPC, which a Ray cluster's GCS speaks): the client
# preface, then an empty SETTINGS frame. A gRPC server answers with a SETTINGS frame at once.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4


def _probe(address: str, timeout_s: float = 3.0) -> None:
    """Refuse within a few seconds a HOST:PORT that is no Ray cluster: ray.init retries such an address
    for many minutes. Something must listen there and answer the HTTP/2 preface as gRPC does."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto" or a ray:// client address: Ray's own lookup answers quickly
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(HTTP2_PREFACE)
        answer = b""
        while len(answer) < 9:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                block = sock.recv(9 - len(answer))
            except OSError:  # a timeout, or a reset: no gRPC server either way
                block = b""
            if not block:
                break
            answer += block
    if len(answer) < 9 or answer[3] != HTTP2_SETTINGS:
        raise ConnectionError(f"what listens there did not answer as a Ray cluster's gRPC server within "
                              f"{timeout_s:g} s")


def _runtime_env() -> dict | None:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIX)}
    return {"env_vars": env} if env else None


def _save_checkpoints(out: Path, checkpoints: dict[str, bytes]) -> None:
    """Checkpoints a cell sent back, each under out/checkpoints by a name checked to stay there."""
    for name, blob in checkpoints.items():
        write_atomic(confine.inside(confine.make_dir(out, "checkpoints"), name), blob)
