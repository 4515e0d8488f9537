"""What machine a cell ran on: hostname, cluster node id, CPU, cores, memory and GPUs, without a framework."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess

from harness.results import cpu_name, total_memory_bytes


def nvidia_gpus() -> list[dict]:
    """The node's NVIDIA GPUs from nvidia-smi: asking a framework would import it into the caller."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"index": parts[0], "name": parts[1],
                         "memory_mb": int(parts[2]) if parts[2].isdigit() else None})
    return gpus


@functools.lru_cache(maxsize=1)
def _hardware() -> dict:
    # Cached: a process describes its node once, not once per cell.
    return {"hostname": socket.gethostname(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "memory_gb": None if (total := total_memory_bytes()) is None else round(total / 2**30, 1),
            "gpus": nvidia_gpus()}


def describe_node(*, executor: str, node_id: str | None = None, **extra) -> dict:
    """The `node` field of a record: which machine ran the cell and what it is."""
    return {**_hardware(), "executor": executor, "node_id": node_id, **extra}
