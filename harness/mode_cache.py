"""--mode best's decisions kept per cell, machine, versions and threads: an identical run does not probe again."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from pathlib import Path

from backends.base import MODES
from harness import confine, storage
from harness.confine import UntrustedInput
from harness.data import cache_dir

log = logging.getLogger(__name__)

# TRIBENCH_MODE_CACHE: the folder (default the user cache's modes/, ~/.cache/tribench/modes), or "off".
ENV = "TRIBENCH_MODE_CACHE"
OFF = "off"
# Bounds on what is read and kept: the folder is anyone's to write into, so every entry is
# untrusted input (size, shape, and a key that must equal the one asked for).
MAX_ENTRY_BYTES = 16 * 1024
MAX_ENTRIES = 256
MAX_TEXT = 300
# What of the worker's env says which programs run how fast here: the machine, the versions, the settings.
ENV_KEYS = ("python", "numpy_version", "machine", "cpu", "cpu_count", "device", "device_name", "framework",
            "framework_version", "threads", "precision", "data_parallel")
RATE_FIELDS = (*MODES, "probe_s", "budget_s")
TEXT_MAPS = ("programs", "untried", "unavailable")


def folder_from_env() -> Path | None:
    """The cache folder TRIBENCH_MODE_CACHE or XDG_CACHE_HOME name; None when the cache is off."""
    value = os.environ.get(ENV, "")
    if value == OFF:
        return None
    if value:
        return Path(value)
    return cache_dir() / "modes"


class ModeCache:
    """One folder of JSON entries, each a decision (`chosen`) and the probe that made it, under a sha256 name."""

    def __init__(self, folder: Path, context: dict):
        self.folder = Path(folder)
        self.context = {k: context.get(k) for k in ENV_KEYS}

    def key(self, backend: str, spec: dict, steps_per_epoch: int) -> dict:
        key = {"backend": backend, "spec": spec, "steps_per_epoch": steps_per_epoch, "env": self.context}
        return json.loads(json.dumps(key, sort_keys=True, default=str))  # as an entry reads back (tuples as lists)

    def _path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:40]
        return confine.inside(self.folder, f"{digest}.json")

    def lookup(self, key: dict, candidates: tuple[str, ...]) -> dict | None:
        """The probe info kept for `key` whose choice is one of `candidates`; None when absent or not valid."""
        try:
            path = self._path(key)
            if not os.path.lexists(path):
                return None
            entry = json.loads(confine.read_bytes(path, limit=MAX_ENTRY_BYTES))
            return valid_entry(entry, key, candidates)
        except (OSError, ValueError, RecursionError, UntrustedInput) as exc:
            log.warning("mode cache entry for %s ignored: %s", key.get("backend"), exc)
            return None

    def store(self, key: dict, probe: dict, *, at: str) -> None:
        """Keep a probe's decision; a cache that cannot be written costs only the next run's probe."""
        try:
            confine.make_dir(self.folder.parent, self.folder.name)
            path = self._path(key)
            storage.write_atomic(path, json.dumps({"key": key, "probe": probe, "cached_at": at},
                                                  sort_keys=True, default=str).encode())
            self._trim()
        except (OSError, UntrustedInput) as exc:
            log.warning("mode cache not written: %s", exc)

    def _trim(self) -> None:
        """Keep the MAX_ENTRIES newest entries."""
        entries = sorted((p for p in self.folder.glob("*.json") if confine.is_regular(p)),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[MAX_ENTRIES:]:
            with contextlib.suppress(OSError):
                old.unlink()


def valid_entry(entry, key: dict, candidates: tuple[str, ...]) -> dict:
    """The entry's probe info, checked field by field, with `cached_at`; ValueError saying what is off."""
    if not isinstance(entry, dict) or entry.get("key") != key:
        raise ValueError("not an entry for this cell")
    probe, at = entry.get("probe"), entry.get("cached_at")
    if not isinstance(probe, dict) or not isinstance(at, str) or len(at) > MAX_TEXT:
        raise ValueError("no probe object or date")
    if probe.get("chosen") not in candidates:
        raise ValueError(f"chosen {str(probe.get('chosen'))[:MAX_TEXT]!r} is not one of {', '.join(candidates)}")
    out = {"chosen": probe["chosen"]}
    for name in RATE_FIELDS:
        value = probe.get(name)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} is not a non-negative number")
        out[name] = value
    for name in ("rounds", "steps"):
        value = probe.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10**6:
            raise ValueError(f"{name} is not a count")
        out[name] = value
    for name in TEXT_MAPS:
        value = probe.get(name)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(
                k in MODES and isinstance(v, str) and len(v) <= MAX_TEXT for k, v in value.items()):
            raise ValueError(f"{name} is not a map of modes to short text")
        out[name] = value
    # This run spent no time probing; the probe that decided took cached_probe_s on cached_at.
    return {**out, "probe_s": 0.0, "cached_probe_s": out["probe_s"], "cached_at": at}
