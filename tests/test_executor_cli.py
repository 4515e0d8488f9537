"""--executor and --ray-address: bad values and a missing Ray exit 2 with one line; no Ray needed."""

import subprocess
import sys

import pytest

from harness.cli import main

# The CLI in a fresh interpreter where `import ray` fails as it does without the extra:
# find_spec answers None for a module that sys.modules maps to None.
WITHOUT_RAY = "import sys; sys.modules['ray'] = None; from harness.cli import main; sys.exit(main(sys.argv[1:]))"


def test_executor_ray_without_ray_installed_exits_2_with_the_install_hint(tmp_path):
    out = subprocess.run([sys.executable, "-c", WITHOUT_RAY, "run", "--executor", "ray", "--task", "mnist-mlp",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert 'pip install "tribench[ray]"' in line and "Traceback" not in line
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize("args, words", [
    (["--executor", "dask"], ["--executor", "dask", "local", "ray"]),
    (["--ray-address", "auto"], ["--ray-address needs --executor ray"]),
])
def test_bad_executor_flags_exit_2_with_one_line(args, words, capsys, tmp_path):
    assert main(["run", "--task", "mnist-mlp", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
