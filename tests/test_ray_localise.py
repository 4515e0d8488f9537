"""The Ray executor's data localisation, tested without Ray: a node finds its own copy of the driver's dataset."""

import dataclasses

from test_data import fake_source, write_mnist

from harness import data
from harness.cells import Cell, cell_config
from harness.ray_executor import localise_data
from harness.run_config import RunConfig


def test_a_driver_path_missing_on_the_node_resolves_to_the_nodes_own_copy(tmp_path, monkeypatch):
    node_copy = tmp_path / "node-cache" / "tribench" / "fashion-mnist"
    write_mnist(node_copy)
    monkeypatch.setitem(data.SOURCES, "fashion-mnist", fake_source(node_copy, "fashion-mnist"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "node-cache"))
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "SYSTEM_DIRS", ())
    cfg = RunConfig(tasks=["mnist-mlp"], backends=["torch"], out=tmp_path / "out", allow_download=False)
    driver_folder = str(tmp_path / "only-on-the-driver" / "fashion-mnist")
    cell_cfg = cell_config(cfg, Cell("mnist-mlp", "torch", 0), ("fashion-mnist", driver_folder))

    localised = localise_data(cell_cfg, allow_download=False)

    assert localised.data_folder == str(node_copy)
    assert dataclasses.replace(localised, data_folder=None) == dataclasses.replace(cell_cfg, data_folder=None)


def test_a_driver_path_present_on_the_node_is_kept(tmp_path):
    corpus = tmp_path / "book.txt"
    corpus.write_text("a corpus that is a single file\n")
    cfg = RunConfig(tasks=["tiny-gpt"], backends=["torch"], out=tmp_path / "out")
    cell_cfg = cell_config(cfg, Cell("tiny-gpt", "torch", 0), ("book.txt", str(corpus)))
    assert localise_data(cell_cfg, allow_download=False) is cell_cfg
