"""`import harness, tasks, backends` must not import any framework, nor Ray."""

import json
import subprocess
import sys


def test_core_packages_import_no_framework():
    code = ("import sys, json, harness, tasks, backends, backends.base, harness.cli, harness.runner, "
            "harness.report, harness.compare, harness.loop, harness.data, harness.weights, harness.ray_executor, "
            "harness.merge, harness.shard, harness.node, harness.history, "
            "harness.comparable, harness.export_common, harness.export_mlflow, harness.export_tensorboard, "
            "tasks.targets; print(json.dumps(sorted(m for m in ('torch', 'tensorflow', 'jax', 'flax', 'optax', "
            "'keras', 'ray', 'mlflow', 'tensorboard') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_list_runs_without_importing_frameworks():
    code = ("import sys, json, contextlib, io; from harness.cli import main; "
            "buf = io.StringIO();\nwith contextlib.redirect_stdout(buf): main(['list'])\n"
            "print(json.dumps(sorted(m for m in ('torch', 'tensorflow', 'jax') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
