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


def test_the_keras_module_is_keras_ops_only():
    """backends/keras_common.py serves any Keras 3 backend: it names no framework but keras, and imports
    keras only when used, after the adapter has chosen Keras's backend."""
    import ast
    from pathlib import Path

    import backends

    tree = ast.parse((Path(backends.__file__).parent / "keras_common.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert imported <= {"__future__", "functools", "dataclasses", "typing", "numpy", "keras"}, imported
    assert not names & {"tf", "tensorflow", "jax", "jnp", "torch"}, names & {"tf", "tensorflow", "jax", "jnp", "torch"}
    code = "import sys, backends.keras_common; print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
