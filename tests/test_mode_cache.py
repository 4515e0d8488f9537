"""--mode best's decision cache: what it keeps, and entries it must not trust (wrong cell, bad values, links, size)."""

import json
import os

import pytest

from harness import mode_cache
from harness.mode_cache import ModeCache

ENV = {"cpu": "test-cpu", "cpu_count": 2, "device": "cpu", "framework": "numpy", "framework_version": "1",
       "threads": 2, "precision": "fp32", "data_parallel": 1, "hostname": "not part of the key"}
PROBE = {"compiled": 900.0, "eager": 1000.0, "chosen": "eager", "probe_s": 3.5, "steps": 10, "rounds": 2,
         "budget_s": 40.0, "programs": {"compiled": "x compiled", "eager": "x eager"}}
CANDIDATES = ("compiled", "eager")


def cache_and_key(tmp_path, **env):
    cache = ModeCache(tmp_path / "modes", {**ENV, **env})
    return cache, cache.key("torch", {"name": "mnist-mlp", "epochs": 1}, 93)


def entry_path(cache, key):
    return cache._path(key)


def test_a_stored_decision_is_read_back_with_its_estimates_and_date(tmp_path):
    cache, key = cache_and_key(tmp_path)
    assert cache.lookup(key, CANDIDATES) is None
    cache.store(key, PROBE, at="2026-12-07T05:00:00+00:00")
    got = cache.lookup(key, CANDIDATES)
    assert got["chosen"] == "eager" and got["eager"] == 1000.0 and got["compiled"] == 900.0
    assert got["cached_at"] == "2026-12-07T05:00:00+00:00" and got["cached_probe_s"] == 3.5 and got["probe_s"] == 0.0
    assert got["programs"] == PROBE["programs"] and got["rounds"] == 2


def test_another_machine_setting_or_cell_is_another_entry(tmp_path):
    cache, key = cache_and_key(tmp_path)
    cache.store(key, PROBE, at="now")
    other_threads, key2 = cache_and_key(tmp_path, threads=1)
    assert other_threads.lookup(key2, CANDIDATES) is None
    assert cache.lookup(cache.key("torch", {"name": "mnist-mlp", "epochs": 2}, 93), CANDIDATES) is None
    assert cache.lookup(cache.key("jax", {"name": "mnist-mlp", "epochs": 1}, 93), CANDIDATES) is None
    # What does not change the programs (the host's name) is not in the key.
    renamed, key3 = cache_and_key(tmp_path, hostname="elsewhere")
    assert renamed.lookup(key3, CANDIDATES)["chosen"] == "eager"


@pytest.mark.parametrize("bad", [
    lambda e: {**e, "key": {**e["key"], "backend": "jax"}},  # an entry for another cell under this name
    lambda e: {**e, "probe": {**e["probe"], "chosen": "fastest"}},
    lambda e: {**e, "probe": {**e["probe"], "eager": -1.0}},
    lambda e: {**e, "probe": {**e["probe"], "eager": "1000"}},
    lambda e: {**e, "probe": {**e["probe"], "compiled": True}},
    lambda e: {**e, "probe": {**e["probe"], "rounds": 1.5}},
    lambda e: {**e, "probe": {**e["probe"], "programs": {"eager": "x" * 1000}}},
    lambda e: {**e, "probe": {**e["probe"], "untried": {"anything": "y"}}},
    lambda e: {**e, "probe": [1, 2]},
    lambda e: {**e, "cached_at": 5},
    lambda e: [e],
])
def test_an_entry_that_is_off_in_any_way_is_ignored(tmp_path, bad):
    cache, key = cache_and_key(tmp_path)
    cache.store(key, PROBE, at="now")
    path = entry_path(cache, key)
    path.write_text(json.dumps(bad(json.loads(path.read_text()))))
    assert cache.lookup(key, CANDIDATES) is None


def test_a_choice_that_is_no_longer_a_candidate_is_ignored(tmp_path):
    cache, key = cache_and_key(tmp_path)
    cache.store(key, {**PROBE, "chosen": "compiled"}, at="now")
    assert cache.lookup(key, ("eager",)) is None


def test_links_non_json_and_oversized_files_are_ignored(tmp_path):
    cache, key = cache_and_key(tmp_path)
    cache.store(key, PROBE, at="now")
    path = entry_path(cache, key)
    path.write_bytes(b"\xff not json")
    assert cache.lookup(key, CANDIDATES) is None
    path.write_text(json.dumps({"pad": "x" * mode_cache.MAX_ENTRY_BYTES}))
    assert cache.lookup(key, CANDIDATES) is None
    elsewhere = tmp_path / "planted.json"
    cache.store(key, PROBE, at="now")
    elsewhere.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(elsewhere)
    assert cache.lookup(key, CANDIDATES) is None


def test_the_folder_keeps_only_the_newest_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(mode_cache, "MAX_ENTRIES", 3)
    cache, _ = cache_and_key(tmp_path)
    keys = [cache.key("torch", {"name": "t", "epochs": i}, 10) for i in range(5)]
    for i, key in enumerate(keys):
        cache.store(key, PROBE, at="now")
        os.utime(entry_path(cache, key), (1000 + i, 1000 + i))
    cache.store(keys[-1], PROBE, at="now")  # trims after its write
    assert len(list((tmp_path / "modes").glob("*.json"))) == 3
    assert cache.lookup(keys[0], CANDIDATES) is None and cache.lookup(keys[-1], CANDIDATES) is not None


def test_an_unwritable_cache_costs_only_the_next_probe(tmp_path):
    (tmp_path / "file").write_text("")
    cache = ModeCache(tmp_path / "file" / "modes", ENV)
    key = cache.key("torch", {}, 1)
    cache.store(key, PROBE, at="now")  # no exception
    assert cache.lookup(key, CANDIDATES) is None


def test_the_folder_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(mode_cache.ENV, mode_cache.OFF)
    assert mode_cache.folder_from_env() is None
    monkeypatch.setenv(mode_cache.ENV, str(tmp_path / "c"))
    assert mode_cache.folder_from_env() == tmp_path / "c"
    monkeypatch.delenv(mode_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mode_cache.folder_from_env() == tmp_path / "xdg" / "tribench" / "modes"
