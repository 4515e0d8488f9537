"""Hugging Face GPT-2 in and out, checked against transformers and peft themselves, not against our own inverse.

A tiny random GPT-2 (vocabulary 256, so byte windows are its tokens) is made and saved by
transformers in the test, its every array perturbed so that a bias or LayerNorm mapped
wrong shows. Tolerances, and why (fp32 backends against transformers in float64):
- Logits 1e-5 absolute (|logits| up to about 2): two blocks of float32 sums, as
  test_tiny_gpt's cross-backend bound.
- Gradients, per array, relative L2 1e-5: one SGD step of lr 100 on each backend, g =
  (w - w_new) / lr; the large step keeps float32's subtraction error (~6e-8 |w|) far
  below the step.
- A trained, converted checkpoint's held-out loss in transformers (float64) against the
  loss tribench reported (float32 sums, float64 total): 1e-6 relative.
"""

import json

import numpy as np
import pytest
from conftest import configured, need

from harness import text
from harness.checkpoint import CheckpointError, save_checkpoint
from harness.hf_gpt2 import (
    ADAPTER_FOLDER,
    CONFIG,
    WEIGHTS,
    HFError,
    canonical_from_hf,
    convert_to_hf,
    load_hf_gpt2,
    sizes_from_config,
)
from harness.loop import run_stages
from tasks.gpt2 import gpt2
from tasks.spec import SGD
from tasks.tiny_gpt import tiny_gpt

# Its module fixture is costly: every test of the module runs in the same test process (pytest-xdist).
pytestmark = pytest.mark.xdist_group("test_hf_gpt2")

SIZES = {"vocab": 256, "d_model": 32, "layers": 2, "heads": 2, "context": 32}
TEXT = text.synthetic(context=SIZES["context"], seed=3, n_windows=(64, 16))


def save_tiny_gpt2(folder, vocab: int):
    """A random stock GPT-2 (tied head, no head bias, gelu_new) saved by transformers."""
    torch = need("torch")
    transformers = need("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():  # biases, LayerNorms and all: a wrong mapping cannot hide at 0 or 1
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt2", 256)


def train_bpe(corpus_text: str, path, vocab: int = 320) -> int:
    """A byte-level BPE tokenizer trained with `tokenizers`, saved as tokenizer.json; its vocabulary size."""
    tokenizers = need("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([corpus_text], trainer)
    tokenizer.save(str(path))
    return tokenizer.get_vocab_size()


def token_windows(path, blob: bytes, context: int = 32):
    """The test's own windows of a tokenizer's ids: x, and y shifted by one token."""
    import tokenizers

    ids = np.asarray(tokenizers.Tokenizer.from_file(str(path)).encode(blob.decode()).ids)
    n = (len(ids) - 1) // context
    return ids[: n * context].reshape(n, context), ids[1: n * context + 1].reshape(n, context)


def hf_model(folder, dtype="float64"):
    import torch
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(folder).to(getattr(torch, dtype)).eval()


def hf_loss(model, x, y) -> float:
    """transformers' mean cross-entropy over every position of the windows (their own logits)."""
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(x.astype(np.int64))).logits
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                        torch.from_numpy(y.astype(np.int64)).reshape(-1)))


def spec_for(folder, **changes):
    return gpt2(name="gpt2-hf-test", **{**sizes_from_config(folder), "batch_size": 8, **changes}).sized_for(8)


def test_sizes_come_from_config_json(hf_folder):
    assert sizes_from_config(hf_folder) == SIZES


def test_logits_of_every_backend_match_transformers(backend_name, hf_folder):
    import torch

    spec = spec_for(hf_folder)
    backend = configured(backend_name)
    model = backend.build(spec, load_hf_gpt2(hf_folder, spec), trainable=None, mode="eager")
    x = TEXT.x_test[:4]
    with torch.no_grad():
        want = hf_model(hf_folder)(torch.from_numpy(x.astype(np.int64))).logits.numpy()
    assert np.abs(want).max() > 0.5  # not trivially small
    np.testing.assert_allclose(backend.logits(model, x), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(backend.logits(model, x[:, :20]), want[:, :20], atol=1e-5, rtol=0)


def test_gradients_of_every_backend_match_transformers(backend_name, hf_folder):
    import torch

    spec = spec_for(hf_folder).with_overrides(optimizer=SGD(lr=100.0))
    w0 = load_hf_gpt2(hf_folder, spec)
    backend = configured(backend_name)
    model = backend.build(spec, w0, trainable=None, mode="eager")
    x, y = TEXT.x_train[:8], TEXT.y_train[:8]
    backend.train_epoch(model, backend.put_data(x, y), np.arange(8, dtype=np.int32), 8)
    got = [(a.astype(np.float64) - b) / 100.0 for a, b in zip(w0, backend.get_weights(model))]
    reference = hf_model(hf_folder)
    logits = reference(torch.from_numpy(x.astype(np.int64))).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, 256), torch.from_numpy(y.astype(np.int64)).reshape(-1)) \
        .backward()
    grads = {name.removeprefix("transformer."): p.grad.numpy() for name, p in reference.named_parameters()}
    wanted = canonical_from_hf(spec, grads)
    largest = max(np.abs(w).max() for w in wanted)
    for entry, g, want in zip(spec.params(), got, wanted):
        if entry.param.name == "key_bias":
            # Zero in exact arithmetic (softmax ignores a constant per query): float32 noise only.
            assert np.abs(g).max() <= 1e-5 * largest, entry.name
            continue
        err = np.linalg.norm(g - want) / np.linalg.norm(want)
        assert err <= 1e-5, f"{entry.name}: gradient relative L2 {err:.2e}"


def test_a_round_trip_is_bit_identical(hf_folder, tmp_path):
    from safetensors.numpy import load_file

    spec = spec_for(hf_folder)
    save_checkpoint(tmp_path / "c.safetensors", spec, load_hf_gpt2(hf_folder, spec))
    (out,) = convert_to_hf(tmp_path / "c.safetensors", tmp_path / "hf")
    before, after = load_file(hf_folder / WEIGHTS), load_file(out / WEIGHTS)
    assert sorted(before) == sorted(after)
    for name, array in before.items():
        assert array.dtype == after[name].dtype and np.array_equal(array, after[name]), name
    config = json.loads((out / CONFIG).read_text())
    assert {k: config[k] for k in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")} == \
        {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 32, "vocab_size": 256}


def test_a_trained_checkpoint_converted_gives_tribenchs_loss_in_transformers(hf_folder, tmp_path):
    spec = spec_for(hf_folder)
    results = run_stages(configured("torch"), spec, TEXT, seed=0, mode="eager",
                         init_from=load_hf_gpt2(hf_folder, spec), checkpoint_prefix=tmp_path / "t")
    m = results["train"].metrics
    assert abs(m["initial_test_loss"] - hf_loss(hf_model(hf_folder), TEXT.x_test, TEXT.y_test)) \
        <= 1e-6 * m["initial_test_loss"]
    (out,) = convert_to_hf(m["checkpoint"], tmp_path / "hf")
    assert m["test_loss"] < m["initial_test_loss"]
    assert abs(hf_loss(hf_model(out), TEXT.x_test, TEXT.y_test) - m["test_loss"]) <= 1e-6 * m["test_loss"]


def test_lora_adapters_load_in_peft_onto_the_base_model(hf_folder, tmp_path):
    import torch

    peft = need("peft")
    spec = tiny_gpt(name="gpt2-lora-test", gpt2=True, vocab=256, d_model=32, layers=2, heads=2, context=32,
                    batch_size=8, lora_rank=2, lora_alpha=4.0).sized_for(8)
    weights = load_hf_gpt2(hf_folder, spec, seed=1)
    rng = np.random.default_rng(0)
    weights = [w + 0.1 * rng.standard_normal(w.shape).astype(np.float32) if e.param.name.endswith("_lora_b") else w
               for e, w in zip(spec.params(), weights)]  # B != 0: the adapters change the function
    save_checkpoint(tmp_path / "lora.safetensors", spec, weights)
    out, adapter = convert_to_hf(tmp_path / "lora.safetensors", tmp_path / "hf")
    assert adapter == out / ADAPTER_FOLDER
    x = TEXT.x_test[:2]
    backend = configured("torch")
    ours = backend.logits(backend.build(spec, weights, trainable=None, mode="eager"), x)
    base = hf_model(out)
    with torch.no_grad():
        plain = base(torch.from_numpy(x.astype(np.int64))).logits.numpy()
        adapted = peft.PeftModel.from_pretrained(base, adapter).eval()
        theirs = adapted(torch.from_numpy(x.astype(np.int64))).logits.numpy()
    assert np.abs(ours - plain).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


# -- untrusted folders --------------------------------------------------------------------------------

def test_a_folder_that_is_not_gpt2_is_refused(hf_folder, tmp_path):
    import shutil

    spec = spec_for(hf_folder)
    bad = tmp_path / "bad"
    shutil.copytree(hf_folder, bad)
    config = json.loads((bad / CONFIG).read_text())
    (bad / CONFIG).write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(HFError, match="activation_function is 'relu'"):
        load_hf_gpt2(bad, spec)
    (bad / CONFIG).write_text(json.dumps(config))
    (bad / WEIGHTS).unlink()
    (bad / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(HFError, match="never pickled"):
        load_hf_gpt2(bad, spec)
    with pytest.raises(CheckpointError, match="n_embd is 32, task"):
        load_hf_gpt2(hf_folder, spec_for(hf_folder, d_model=64))


@pytest.mark.slow
def test_tribench_finetunes_a_transformers_gpt2_on_three_frameworks(tmp_path):
    """The whole path, offline: a random GPT-2 saved by transformers with a BPE tokenizer trained here.
    `tribench run --task gpt2 --init-from FOLDER` on every backend starts at the loss transformers
    computes on the same held-out token windows (1e-5 relative), and each backend's trained
    checkpoint, converted, gives its reported final loss in transformers (1e-4 relative)."""
    from conftest import INSTALLED

    from harness.cli import main
    from harness.results import read_records

    corpus = tmp_path / "corpus.txt"
    blob = text.markov_bytes(12_000, seed=4, stream=1)
    corpus.write_bytes(blob)
    hf_folder = tmp_path / "gpt2"
    hf_folder.mkdir()
    vocab = train_bpe(blob[: int(len(blob) * text.TRAIN_FRACTION)].decode(), hf_folder / "tokenizer.json")
    save_tiny_gpt2(hf_folder, vocab)
    out = tmp_path / "run"
    backends = [b for b in ("torch", "tensorflow", "jax") if b in INSTALLED]
    assert main(["run", "--task", "gpt2", "--backend", ",".join(backends), "--init-from", str(hf_folder),
                 "--data-dir", str(corpus), "--epochs", "1", "--mode", "eager", "--threads", "1",
                 "--out", str(out)]) == 0
    x_test, y_test = token_windows(hf_folder / "tokenizer.json", blob[int(len(blob) * text.TRAIN_FRACTION):])
    start = hf_loss(hf_model(hf_folder), x_test, y_test)
    records = {r["backend"]: r for r in read_records(out)}
    assert sorted(records) == sorted(backends)
    for backend, record in records.items():
        m = record["metrics"]
        assert record["status"] == "ok" and record["spec"]["input_shape"] == [32], backend
        assert record["data"]["tokenizer"] == str(hf_folder / "tokenizer.json") and m["bits_per_byte"] is None
        assert record["data"]["n_test"] == len(x_test) and record["spec"]["num_classes"] == vocab
        assert abs(m["initial_test_loss"] - start) <= 1e-5 * start, backend
        (converted,) = convert_to_hf(m["checkpoint"], tmp_path / f"hf-{backend}")
        final = hf_loss(hf_model(converted), x_test, y_test)
        assert m["test_loss"] < m["initial_test_loss"] and abs(final - m["test_loss"]) <= 1e-4 * m["test_loss"], \
            backend


@pytest.mark.slow
def test_gpt2_finetune_compares_lora_with_full_finetuning_and_scratch_from_a_hf_model(hf_folder):
    from tasks.gpt2 import gpt2_finetune

    spec = gpt2_finetune(name="gpt2-finetune-test", **{**sizes_from_config(hf_folder), "batch_size": 8},
                         lora_rank=2, lora_alpha=4.0)
    weights = load_hf_gpt2(hf_folder, spec)
    results = run_stages(configured("torch"), spec, TEXT, seed=0, mode="eager", init_from=weights)
    assert list(results) == ["finetune", "lora", "scratch"]  # the Hugging Face weights stand in for pretrain
    start = hf_loss(hf_model(hf_folder), TEXT.x_test, TEXT.y_test)  # LoRA's B = 0: the same function
    for name in ("finetune", "lora"):
        assert abs(results[name].metrics["initial_test_loss"] - start) <= 1e-6 * start, name
        assert results[name].metrics["test_loss"] < start, name
    counts = {n: r.metrics["params_trainable"] for n, r in results.items()}
    assert counts["lora"] == 2 * 4 * (32 * 2 + 2 * 32) < counts["finetune"] == counts["scratch"]
    for entry, before, after in zip(spec.params(), weights, results["lora"].weights):
        if "_lora_" not in entry.name:
            np.testing.assert_array_equal(before, after, err_msg=f"lora: {entry.name} is frozen but changed")


def test_converting_a_checkpoint_that_is_not_gpt2_exits_2_with_one_line(tmp_path, capsys):
    from harness.cli import main
    from harness.weights import initial_weights
    from tasks import get_task

    spec = get_task("tiny-gpt")  # a GPT, but not GPT-2's: untied head with a bias, exact GELU
    save_checkpoint(tmp_path / "c.safetensors", spec, initial_weights(spec, 0))
    assert main(["convert", str(tmp_path / "c.safetensors"), "--to", "hf-gpt2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "layer 'block0_fc' has activation 'gelu' (GPT-2: 'gelu_tanh')" in err, err
    assert not (tmp_path / "o").exists()
