"""Shared fixtures: which backends are installed, and a strict mode that refuses to skip them."""

from __future__ import annotations

import importlib
import itertools
import os
import sys
from pathlib import Path

import pytest

from backends import BACKENDS

# tox's parity env sets TRIBENCH_REQUIRE_BACKENDS=all: there a missing framework is a
# failure, not a skip, so a broken install can never turn the suite green.
_required = os.environ.get("TRIBENCH_REQUIRE_BACKENDS", "")
REQUIRED = list(BACKENDS) if _required == "all" else [b for b in _required.split(",") if b]
INSTALLED = [name for name, info in BACKENDS.items() if info.available()]

# The worker honours TRIBENCH_FAULT only under the test suite; workers inherit this.
os.environ["TRIBENCH_TESTING"] = "1"
# Runs under test probe afresh and leave the user's mode cache alone; tests of the cache name their own folder.
os.environ.setdefault("TRIBENCH_MODE_CACHE", "off")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config):
    """tests/bench is the benchmark suite (`tox -e bench`), collected only with pytest-benchmark enabled.

    Keyed on pytest-benchmark's own switch: pyproject's addopts disable it, and the
    bench env's --benchmark-enable both turns timing on and brings these tests in.
    """
    if collection_path == Path(__file__).parent / "gpu":
        # The GPU checks need an NVIDIA GPU: collected only where one is promised
        # (TRIBENCH_GPU_TESTS=1, `tox -e gpu`), and there an absent GPU fails them.
        return None if os.environ.get("TRIBENCH_GPU_TESTS") == "1" else True
    if collection_path == Path(__file__).parent / "bench":
        try:
            enabled = not config.getoption("benchmark_disable") or config.getoption("benchmark_enable")
        except ValueError:  # pytest-benchmark not installed
            enabled = False
        return None if enabled else True
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    """Under `--dist loadgroup` a test process refuses to start when pytest-xdist lost the tests' groups.

    pytest-xdist adds the group to each marked test's id, and its scheduler keeps one id suffix on
    one process; where pytest no longer lets it (pytest 9.2), the groups spread over every process
    silently and each sets up the module fixture the group was there to share (constraints-cpu.txt).
    """
    if not getattr(config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        message = (f"pytest-xdist did not group {len(lost)} tests marked xdist_group (e.g. {lost[0]}): "
                   "install the pinned pytest (pip install -c constraints-cpu.txt -e '.[dev]')")
        sys.__stderr__.write(message + "\n")  # a test process's error reaches the terminal only as an assertion
        raise pytest.UsageError(message)


def need(module: str):
    """An extra's module; a skip only where it is not installed and CI (TRIBENCH_REQUIRE_EXTRAS) does not demand it."""
    if module in os.environ.get("TRIBENCH_REQUIRE_EXTRAS", "").split(","):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"the {module} package (an extra of tribench) is not installed")


def require(name: str) -> None:
    if name not in INSTALLED:
        if name in REQUIRED:
            pytest.fail(f"backend {name} is required here (TRIBENCH_REQUIRE_BACKENDS) but not installed")
        pytest.skip(f"{name} not installed ({BACKENDS[name].install_hint})")


@pytest.fixture(params=list(BACKENDS))
def backend_name(request) -> str:
    require(request.param)
    return request.param


@pytest.fixture(params=[f"{a}-{b}" for a, b in itertools.combinations(BACKENDS, 2)])
def backend_pair(request) -> tuple[str, str]:
    a, b = request.param.split("-")
    require(a)
    require(b)
    return a, b


@pytest.fixture(scope="session")
def fast_backend() -> str:
    """The quickest installed backend to start, for tests of the runner rather than a framework."""
    for name in ("jax", "torch", "tensorflow"):
        if name in INSTALLED:
            return name
    pytest.skip("no backend installed")


# Threads per framework in the in-process tests; CI reruns the parity tests with 1
# (tox -e parity-shuffled), so a tolerance that holds for one kernel choice only fails there.
TEST_THREADS = int(os.environ.get("TRIBENCH_TEST_THREADS", "2"))
_configured: dict[str, tuple[object, str]] = {}


def configured(name: str, precision: str = "fp32"):
    """One adapter per backend per test process (frameworks start once), configured for `precision`.

    A backend asked for another precision than its last is configured again: precision is
    process-wide framework state (jax's x64 flag, Keras's dtype policy), set by configure.
    """
    from backends import get_backend

    backend, current = _configured.get(name, (None, None))
    if backend is None:
        backend = get_backend(name)
    if current != precision:
        backend.configure(device="cpu", threads=TEST_THREADS, precision=precision)
        _configured[name] = backend, precision
    return backend


def seed_framework(name: str, seed: int) -> None:
    """Seed the framework generator that `name`'s adapter draws dropout masks from, so a test owns its
    masks instead of taking whatever state earlier tests left. JAX needs none: its keys come from spec.seed."""
    if name == "torch":
        import torch

        torch.manual_seed(seed)
    elif name == "tensorflow":
        import keras

        keras.utils.set_random_seed(seed)  # Python's, numpy's and TF's generators, and Keras's seed generators
