"""tribench's harness: runner, worker, CLI, data, measurement, results, reports."""
