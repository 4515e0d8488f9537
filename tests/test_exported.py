"""Exported models in their runtimes: logits parity with the framework, sizes, timings; a missing extra exits 2."""

import importlib
import importlib.util
import os

import pytest
from conftest import configured

from harness.cli import main
from harness.data import synthetic
from harness.exporting import PARITY_RTOL, export_figures
from harness.weights import initial_weights
from tasks import get_task

ONNX_BACKENDS = ("torch", "tensorflow")  # the two with a maintained ONNX exporter


@pytest.mark.parametrize("task", ["mnist-mlp", "cifar-cnn"])
def test_exports_match_the_frameworks_logits_in_their_runtimes(backend_name, task, tmp_path):
    required = "onnx" in os.environ.get("TRIBENCH_REQUIRE_EXTRAS", "").split(",")
    for module in ("onnx", "onnxruntime", "onnxscript", "tf2onnx"):  # CI requires them: an import error fails
        importlib.import_module(module) if required else pytest.importorskip(
            module, reason="the tribench[onnx] extra is not installed")
    backend = configured(backend_name)
    spec = get_task(task)
    x = synthetic("mnist" if task == "mnist-mlp" else "cifar10", n_train=8, n_test=256, seed=0).x_test
    model = backend.build(spec, initial_weights(spec, 0), trainable=None, mode="eager")
    out = export_figures(backend, model, x, formats=("onnx", "native"), folder=tmp_path, batch_size=128,
                         train_s=1e-6)
    formats = ("onnx", "native") if backend_name in ONNX_BACKENDS else ("native",)
    for fmt in formats:
        figures = out[fmt]
        assert "error" not in figures, figures.get("error")
        assert figures["parity_ok"] and figures["parity_rtol"] == PARITY_RTOL, figures["max_abs_logit_diff"]
        assert figures["size_bytes"] > 4 * spec.param_count() * 0.9  # the weights are inside
        assert figures["infer_latency_calls"] >= 200 and figures["infer_samples_per_s"] > 0
        assert all((tmp_path / name).exists() or any(tmp_path.rglob(name)) for name in figures["files"])
    if backend_name == "jax":
        assert out["onnx"]["unsupported"] and "no maintained" in out["onnx"]["error"]


def test_asking_for_an_export_without_the_extra_exits_2_with_the_hint(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    code = main(["run", "--task", "mnist-mlp", "--backend", "torch", "--export", "onnx", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tribench: error: --export onnx needs") and 'pip install "tribench[onnx]"' in err
    assert not list(tmp_path.iterdir())


def test_an_unknown_export_format_exits_2(tmp_path, capsys):
    assert main(["run", "--task", "mnist-mlp", "--backend", "torch", "--export", "tflite", "--out",
                 str(tmp_path)]) == 2
    assert "valid formats are onnx, native" in capsys.readouterr().err


def test_the_report_shows_each_exported_format_as_a_row_under_its_backend():
    from record_factory import make_record

    from harness import report

    record = make_record("mnist-mlp", "torch", 0)
    record["exported"] = {
        "onnx": {"exporter": "torch.onnx.export(dynamo=True) -> onnxruntime", "size_bytes": 2**20,
                 "max_abs_logit_diff": 2e-6, "parity_ok": True, "infer_latency_ms_p50": 0.05,
                 "infer_samples_per_s": 123456.0},
        "native": {"error": "no exporter", "unsupported": True},
    }
    table = report.summary_table([record]).set_index("backend")
    onnx = table.loc["torch \u2192 onnx"]
    assert onnx["infer samples/s"].startswith("123,456") and onnx["latency p50 b1 (ms)"].startswith("0.05")
    assert onnx[report.EXPORT_HEADER] == "1.00 MiB, 2.0e-06 (parity ok)" and onnx["status"] == "ok"
    native = table.loc["torch \u2192 native"]
    assert native["status"] == "unsupported" and native["error"] == "no exporter"
    assert "torch \u2192 onnx" in report.render_terminal([record])
