"""tribench's harness: runner, worker, CLI, data, measurement, results, reports."""

__version__ = "0.1.0"  # the one place the version is written; pyproject.toml reads it
