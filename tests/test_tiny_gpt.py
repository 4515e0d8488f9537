"""The tiny-gpt task: text corpora, --override, sequence metrics, and cross-backend parity of a small GPT.

Tolerances, and why (fp32 CPU, the 1-block width-32 context-16 model below; measured on the
2-core machine, worst pair of torch / tensorflow / jax):
- Initial held-out loss 1e-4 relative, the harness's INITIAL_LOSS_RTOL for fp32: the same
  weights and windows, only float32 summation order differs. Measured: 0 (equal to print).
- Logits 1e-5 absolute (|logits| up to 1.7): embeddings, causal attention, a 4x GELU MLP and
  two LayerNorms in float32, summed in different orders. Measured: 9.8e-7 (torch vs jax).
- One epoch's 16 per-step training losses 1e-4 relative: AdamW, warm-up cosine, clipping;
  float32 noise grows step by step through Adam's per-element normalisation. Measured:
  2.3e-6 (tensorflow vs torch).
"""

import dataclasses
import functools
import math

import numpy as np
import pytest
from conftest import configured

from harness import text
from harness.data import DataError, accepted_for, download, load_stage, resolve, sha256_of
from harness.loop import epoch_order
from harness.weights import initial_weights
from tasks import BUILDERS, TASKS, override_task, parse_override
from tasks.datasets import DATASETS
from tasks.spec import SpecError
from tasks.tiny_gpt import TINY_GPT, TINY_GPT_FINETUNE, tiny_gpt, tiny_gpt_finetune, untrained_loss

# Built straight on a backend, outside the loop: its schedule sized here, for DATA's 16 steps per epoch.
SMALL = tiny_gpt(name="tiny-gpt-test", d_model=32, layers=1, heads=2, context=16, batch_size=8, epochs=1,
                 lr=3e-3).sized_for(16)


# -- the task ----------------------------------------------------------------------------------

def test_tiny_gpt_has_the_issue_sizes():
    assert TINY_GPT.input_shape == (128,) and TINY_GPT.batch_size == 32 and TINY_GPT.takes_tokens
    kinds = [layer.kind for layer, _, _ in TINY_GPT.walk()]
    assert kinds.count("multiheadselfattention") == 4 and kinds[0] == "embedding" and kinds[-1] == "dense"
    assert all(layer.causal for layer, _, _ in TINY_GPT.walk() if layer.kind == "multiheadselfattention")
    o = TINY_GPT.optimizer
    assert (o.kind, o.clip_norm, o.schedule.kind) == ("adamw", 1.0, "warmup_cosine")


def test_override_rebuilds_sizes_and_refuses_unknown_keys():
    try:
        big = override_task("tiny-gpt", parse_override("d_model=768,layers=12,heads=12,context=1024"))
        assert big.input_shape == (1024,) and TASKS["tiny-gpt"] is big
        # GPT-2 small's 85M non-embedding parameters, plus byte embeddings and 1024 positions.
        assert 85e6 < big.param_count() < 87e6
        assert override_task("tiny-gpt", {}) == TINY_GPT  # always rebuilt from the defaults
        with pytest.raises(SpecError, match="unknown key 'width'"):
            override_task("tiny-gpt", {"width": 3})
        with pytest.raises(SpecError, match="multiple of heads"):
            override_task("tiny-gpt", {"d_model": 30, "heads": 4})
        with pytest.raises(SpecError, match="no size parameters"):
            override_task("mnist-mlp", {"units": 3})
        assert parse_override("lr=0.01, epochs=3") == {"lr": 0.01, "epochs": 3}
        with pytest.raises(SpecError, match="not key=value"):
            parse_override("d_model")
    finally:
        TASKS["tiny-gpt"] = TINY_GPT
    assert set(BUILDERS) <= set(TASKS)


def test_cli_override_reaches_the_run_config(tmp_path):
    from harness.cli import build_parser, run_config

    args = build_parser().parse_args(["run", "--task", "tiny-gpt", "--backend", "torch", "--out", str(tmp_path),
                                      "--override", "d_model=64,layers=2,heads=2,context=32"])
    try:
        cfg = run_config(args)
        assert cfg.spec_dict("tiny-gpt")["input_shape"] == [32]
    finally:
        TASKS["tiny-gpt"] = TINY_GPT


# -- text data ---------------------------------------------------------------------------------

def test_reader_skips_links_binaries_and_hidden_files_and_splits_each_file(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"A" * 90 + b"a" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes("é".encode() * 50)  # 100 bytes of UTF-8
    (tmp_path / "a.dat").write_bytes(b"\x00\x01\xff")
    (tmp_path / ".hidden").write_text("never")
    (tmp_path / "a.u8").symlink_to(tmp_path / "a.txt")
    assert [p.name for p in text.corpus_files(tmp_path)] == ["a.txt", "b"]
    train, held = text.read_corpus(tmp_path)
    assert train == b"A" * 90 + "é".encode() * 45 and held == b"a" * 10 + "é".encode() * 5
    with pytest.raises(DataError, match="not UTF-8 text"):
        text.read_corpus(tmp_path / "a.dat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no UTF-8 text files"):
        text.read_corpus(tmp_path / "empty")


def test_windows_are_next_byte_targets():
    x, y = text.windows(bytes(range(10)), 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert x.dtype == np.int32


def test_synthetic_text_is_deterministic_labelled_and_learnable():
    a = text.synthetic(context=16, seed=3, n_windows=(200, 20))
    b = text.synthetic(context=16, seed=3, n_windows=(200, 20))
    assert a.synthetic and a.source == "synthetic" and a.name == "synthetic-text"
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, text.synthetic(context=16, seed=4, n_windows=(200, 20)).x_train)
    # Learnable: the next byte given the current one has far less than 8 bits of entropy.
    pairs = np.stack([a.x_train.ravel(), a.y_train.ravel()], 1)
    _, counts = np.unique(pairs, axis=0, return_counts=True)
    _, first = np.unique(a.x_train.ravel(), return_counts=True)
    conditional = -(counts * np.log2(counts)).sum() / counts.sum() + (first * np.log2(first)).sum() / first.sum()
    assert conditional < 2.5


def test_auto_uses_the_data_dir_then_fortunes_then_synthetic(tmp_path, monkeypatch, caplog):
    corpus = tmp_path / "book.txt"
    corpus.write_text("hello world " * 100)
    corpora = accepted_for(TINY_GPT)  # what a text task accepts: the text corpora
    assert resolve(corpora, "auto", data_dir=corpus)[:2] == ("text", str(corpus))
    ds = text.load("text", str(corpus), context=16, seed=0, subset=None)
    assert not ds.synthetic and len(ds.x_train) == (1080 - 1) // 16
    monkeypatch.setitem(DATASETS, "fortunes",
                        dataclasses.replace(DATASETS["fortunes"], system_dir=str(tmp_path / "none")))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with caplog.at_level("WARNING"):
        assert resolve(corpora, "auto", allow_download=False)[:2] == ("synthetic", "synthetic")
    assert "SYNTHETIC" in caplog.text
    with pytest.raises(DataError, match="apt-get install fortunes"):
        resolve(corpora, "fortunes")


def test_fortunes_is_found_when_installed():
    folder = text.system_corpus("fortunes")
    if folder is None:
        pytest.skip("the fortunes package is not installed here")  # CI installs it; a laptop may not
    files = text.corpus_files(folder)
    assert files and not any(f.suffix in (".dat", ".u8") for f in files)


def test_tiny_shakespeare_download_checks_its_sha256(tmp_path, monkeypatch):
    served = tmp_path / "server"
    served.mkdir()
    (served / "input.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    digest = sha256_of(served / "input.txt")
    fake = dataclasses.replace(DATASETS["tiny-shakespeare"], files={"input.txt": digest}, url=served.as_uri() + "/")
    folder = download(fake)
    assert (folder / "input.txt").read_bytes() == (served / "input.txt").read_bytes()
    bad = dataclasses.replace(fake, name="tiny-shakespeare-bad", files={"input.txt": "0" * 64})
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        download(bad)
    assert not (tmp_path / "cache" / "tribench" / "tiny-shakespeare-bad" / "input.txt").exists()


# -- parity across backends --------------------------------------------------------------------

DATA = text.synthetic(context=16, seed=5, n_windows=(128, 32))


@functools.cache
def run_small(name: str):
    """(logits of 4 held-out windows, initial held-out loss, one epoch's step losses) from the same weights."""
    backend = configured(name, "fp64")  # float64: backends agree to rounding on any CPU
    # Eager: torch.compile of this model takes ~50 s on 2 cores, a CI budget the compiled
    # path's parity (tests/test_parity.py, test_kinds.py) does not need spent twice.
    model = backend.build(SMALL, initial_weights(SMALL, 0), trainable=None, mode="eager")
    logits = backend.logits(model, DATA.x_test[:4])
    initial, _ = backend.evaluate(model, backend.put_data(DATA.x_test, DATA.y_test), 16)
    order = epoch_order(0, 0, 0, len(DATA.x_train), SMALL.batch_size)
    losses = backend.train_epoch(model, backend.put_data(DATA.x_train, DATA.y_train), order, SMALL.batch_size)
    return logits, initial, np.asarray(losses, np.float64)


def test_untrained_loss_is_about_ln_256(backend_name):
    _, initial, losses = run_small(backend_name)
    # Not exactly ln 256: the Glorot head gives logits of variance about d * 2 / (d + 256) = 0.22
    # on LayerNormed inputs, which adds about half that (0.11) to the loss; measured 5.616.
    assert abs(initial - untrained_loss()) < 0.15
    assert losses[-1] < losses[0] - 0.3  # it learns the chain within one epoch


def test_initial_loss_logits_and_loss_curve_agree(backend_pair):
    # In float64 (run_small): measured on a 2-core Xeon, logits within 1.7e-15, initial loss and
    # every step's loss within 1e-15 relative, for all three pairs; held to 1e-12.
    (la, ia, ca), (lb, ib, cb) = (run_small(n) for n in backend_pair)
    assert la.shape == (4, 16, 256) and np.abs(la).max() > 0.05
    assert abs(ia - ib) / abs(ia) <= 1e-12
    np.testing.assert_allclose(la, lb, atol=1e-12, rtol=0)
    np.testing.assert_allclose(ca, cb, rtol=1e-12)


# -- finetuning across backends ------------------------------------------------------------------

FT = tiny_gpt_finetune(d_model=32, layers=2, heads=2, context=16, batch_size=8, epochs=1, lr=3e-3)
CORPUS_B = text.synthetic(context=16, seed=6, n_windows=(64, 32))


def test_finetune_task_freezes_embeddings_and_the_lower_half_and_lora_trains_adapters_alone():
    spec = TINY_GPT_FINETUNE
    stages = {s.name: s for s in spec.stages}
    assert list(stages) == ["pretrain", "finetune", "lora", "scratch"]
    assert stages["finetune"].init == stages["lora"].init == "pretrain"
    assert stages["finetune"].data == stages["lora"].data == stages["scratch"].data == "licenses"
    layers_of = {name: {e.layer for e in spec.params() if spec.trains(e, stages[name].trainable)} for name in stages}
    assert {"block1_attn_mhsa", "block1_fc", "ln_f", "head"} <= layers_of["finetune"]
    assert not layers_of["finetune"] & {"tok_emb", "pos_emb", "block0_attn_mhsa", "block0_fc", "block0_ln1"}
    lora = [e for e in spec.params() if spec.trains(e, stages["lora"].trainable)]
    assert lora and all("_lora_" in e.param.name for e in lora)
    # Rank 4 on q, k, v and out of 2 blocks at width 64: 2 x 4 x (64 x 4 + 4 x 64).
    assert spec.param_count(stages["lora"].trainable) == 4096
    # No stage but lora trains an adapter; pretrain and scratch train every other array.
    for name in ("pretrain", "finetune", "scratch"):
        assert not any("_lora_" in e.param.name for e in spec.params() if spec.trains(e, stages[name].trainable))
    assert spec.param_count(stages["pretrain"].trainable) == spec.param_count() - 4096


def test_stage_corpus_of_a_synthetic_run_is_another_synthetic_chain():
    b = load_stage(tiny_gpt(context=16), "licenses", run_source="synthetic", seed=0, subset=(8, 4))
    a = text.load("synthetic", "synthetic", context=16, seed=0, subset=(8, 4))
    assert b.synthetic and b.x_train.shape == a.x_train.shape == (8, 16)
    assert not np.array_equal(a.x_train, b.x_train)


@functools.cache
def torch_pretrained(tmp: str):
    """Pretrain FT's first stage on torch, save a checkpoint, read it back: the weights another backend starts from."""
    from harness.checkpoint import load_checkpoint_for, save_checkpoint
    from harness.loop import train_stage

    torch = configured("torch")
    result = train_stage(torch, FT, 0, DATA, initial_weights(FT, 0), seed=0, mode="eager", progress=lambda e: None)
    path = f"{tmp}/pretrain.safetensors"
    save_checkpoint(path, FT, result.weights, meta={"stage": "pretrain", "backend": "torch"})
    weights = load_checkpoint_for(path, FT)
    model = torch.build(FT.sized_for(1), weights, trainable=None, mode="eager")
    loss_on_b, _ = torch.evaluate(model, torch.put_data(CORPUS_B.x_test, CORPUS_B.y_test), 16)
    return weights, loss_on_b


def test_torch_pretrained_checkpoint_is_finetuned_by_every_backend(backend_name, tmp_path_factory):
    from harness.loop import run_stages

    weights, loss_on_b = torch_pretrained(str(tmp_path_factory.getbasetemp()))
    backend = configured(backend_name)
    results = run_stages(backend, FT, DATA, seed=0, mode="eager", init_from=weights,
                         stage_data={"finetune": CORPUS_B, "lora": CORPUS_B, "scratch": CORPUS_B})
    assert list(results) == ["finetune", "lora", "scratch"]  # the checkpoint stands in for pretraining
    for name in ("finetune", "lora"):
        stage = results[name]
        # Both start from torch's weights (B = 0: the adapters add nothing yet), so their initial
        # held-out loss on B is torch's, within the fp32 initial-loss tolerance 1e-4 relative.
        assert abs(stage.metrics["initial_test_loss"] - loss_on_b) / loss_on_b <= 1e-4, name
        assert stage.metrics["test_loss"] < stage.metrics["initial_test_loss"], name
        trainable = FT.stage(name).trainable
        for entry, before, after in zip(FT.params(), weights, stage.weights):
            if FT.trains(entry, trainable):
                continue
            np.testing.assert_array_equal(before, after, err_msg=f"{name}: {entry.name} is frozen but changed")
    counts = [results[n].metrics["params_trainable"] for n in ("lora", "finetune", "scratch")]
    assert counts[0] < counts[1] < counts[2] == FT.param_count(FT.stage("scratch").trainable)


def test_report_judges_language_models_by_held_out_loss():
    from record_factory import make_record

    from harness.report import parity_line, render_terminal

    records = []
    for backend, loss in (("torch", 2.0), ("jax", 2.2)):
        r = make_record("tiny-gpt-finetune", backend)
        r["spec"] = {"stages": [{"name": "pretrain"}, {"name": "finetune"}, {"name": "scratch"}]}
        r["metrics"].update(test_loss=loss, bits_per_byte=loss / math.log(2), train_tokens_per_s=1000.0,
                            eval_tokens_per_s=2000.0, scratch_loss=2.5,
                            stage_test_loss={"finetune": loss, "pretrain": 1.5, "scratch": 2.5},
                            stage_params_trainable={"finetune": 10, "pretrain": 20, "scratch": 20})
        records.append(r)
    line = parity_line(records)
    assert "held-out-loss gap between backends 9.1e-02 relative" in line and "lower is better" in line
    assert "torch: pretrain 1.5000 (20 trainable), finetune 2.0000 (10 trainable), scratch 2.5000" in line
    table = render_terminal(records)
    assert "bits/byte" in table and "train tokens/s" in table and "scratch loss" in table
    assert "bits/byte" not in render_terminal([make_record("mnist-mlp", "torch")])
