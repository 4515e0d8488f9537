"""The `node` of a record: this machine's CPU, cores, memory, and its GPUs as nvidia-smi lists them."""

import stat

from harness import node


def test_gpus_are_read_from_nvidia_smi(tmp_path, monkeypatch):
    # The line format an H100 node's nvidia-smi gives for this query.
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0, NVIDIA H100 80GB HBM3, 81559\\n1, NVIDIA H100 80GB HBM3, 81559\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert node.nvidia_gpus() == [{"index": str(i), "name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559}
                                  for i in (0, 1)]


def test_no_nvidia_smi_means_no_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert node.nvidia_gpus() == []


def test_a_node_says_what_machine_it_is():
    info = node.describe_node(executor="local")
    assert info["executor"] == "local" and info["node_id"] is None and info["hostname"]
    assert info["cpu"] and info["cpu_count"] >= 1 and info["memory_gb"] > 0
