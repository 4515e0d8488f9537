"""Measurement helpers: host memory (sampled RSS, ru_maxrss) and the roofline's peak (CPU probe, GPU table)."""

from __future__ import annotations

import json
import logging
import os
import resource
import threading
import time
from pathlib import Path

from harness.storage import write_atomic

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
try:
    import psutil

    _PROCESS = psutil.Process()
except ImportError:  # a core dependency, but a run without it still measures on Linux
    _PROCESS = None


def rss_mb() -> float:
    """Current resident set size of this process, MiB: psutil on any OS, else Linux's /proc."""
    if _PROCESS is not None:
        return _PROCESS.memory_info().rss / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:  # neither psutil nor /proc: ru_maxrss is the best we have
        return max_rss_mb()


def max_rss_mb() -> float:
    """Peak RSS the kernel saw for this process (KiB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Samples RSS from a daemon thread while training runs, keeping the peak.

    ru_maxrss alone counts import-time spikes and cannot be reset; the sampler sees the
    training phase itself. The record keeps the larger of the two as peak_rss_mb.
    """

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.peak_mb = rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


def _probe_gflops(n: int = 2048, repeats: int = 5) -> float:
    import numpy as np

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b  # warm the BLAS thread pool
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def matmul_peak_gflops(cache: Path | None = None, *, refresh: bool = False) -> float:
    """The machine's fp32 matmul peak (numpy BLAS, best of 5), cached per host and CPU.

    It is the roofline's ceiling: what a well-tuned GEMM gets on these cores. Cached so
    that every cell of a run, and later runs, divide by the same number.
    """
    from harness.results import cpu_name

    cache = cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tribench" / "matmul_peak.json"
    key = f"{os.uname().nodename}|{cpu_name()}|{os.cpu_count()}"
    cached = _read_cache(cache)
    if key in cached and not refresh:
        return cached[key]
    # A probe on a busy machine reads low, so a new probe only ever raises the cached peak.
    value = max(round(_probe_gflops(), 1), cached.get(key, 0.0))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, json.dumps({**cached, key: value}).encode())
    except OSError as exc:
        log.debug("cannot cache the matmul probe: %s", exc)
    return value


# Bounds of a believable fp32 matmul peak for a host CPU, GFLOP/s: a cached value outside
# them (a hand edit, a probe on a machine thrashing at the time) would turn every roofline
# into nonsense, so it is dropped and the probe runs again.
PEAK_BOUNDS = (0.5, 1e6)


def _read_cache(cache: Path) -> dict[str, float]:
    """The cache's believable entries; anything unreadable or out of bounds is ignored (and re-probed)."""
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if cache.exists():
            log.warning("ignoring the unreadable matmul-peak cache %s (%s)", cache, exc)
        return {}
    if not isinstance(cached, dict):
        log.warning("ignoring the matmul-peak cache %s: not a JSON object", cache)
        return {}
    sane = {k: float(v) for k, v in cached.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and PEAK_BOUNDS[0] <= v <= PEAK_BOUNDS[1]}
    if len(sane) != len(cached):
        log.warning("ignoring %d implausible entries of the matmul-peak cache %s", len(cached) - len(sane), cache)
    return sane


# Dense (no sparsity) peak TFLOP/s per precision from NVIDIA's datasheets; matched by a
# substring of the device name the framework reports, most specific first. A GPU has no
# cheap honest probe (clocks ramp, cuBLAS picks kernels per shape), so the roofline uses
# the vendor's figure and the record names it.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float], str], ...] = (
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}, "NVIDIA H100 PCIe datasheet, dense"),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}, "NVIDIA H100 SXM5 datasheet, dense"),
    ("H200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}, "NVIDIA H200 SXM datasheet, dense"),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}, "NVIDIA A100 datasheet, dense"),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0}, "NVIDIA L40S datasheet, dense"),
    ("L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0}, "NVIDIA L4 datasheet, dense"),
    ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0}, "NVIDIA A10 datasheet, dense"),
)


def gpu_peak_gflops(device_name: str, precision: str) -> tuple[float, str] | tuple[None, None]:
    """(peak GFLOP/s, source) for a known GPU at the run's precision, else (None, None)."""
    for key, peaks, source in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks[precision] * 1e3, f"{source}, {precision}"
    return None, None


def roofline_peak(env: dict, *, refresh: bool = False) -> tuple[float | None, str | None]:
    """The ceiling the roofline divides by, for the device the cell actually ran on, and its source.

    `refresh` re-probes a CPU's peak (see matmul_peak_gflops); a GPU's comes from the table.
    """
    if env.get("device") == "gpu":
        return gpu_peak_gflops(str(env.get("device_name", "")), env.get("precision", "fp32"))
    return matmul_peak_gflops(refresh=refresh), "numpy float32 2048x2048 matmul on this host, best of 5"
