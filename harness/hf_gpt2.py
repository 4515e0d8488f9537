"""Hugging Face GPT-2 folders in and out (config.json + model.safetensors), and LoRA adapters as PEFT folders.

The map onto the canonical GPT (tasks/tiny_gpt.py's gpt_layers with gpt2=True): GPT-2's
Conv1D kernels are already (in, out); q, k and v are c_attn's three column blocks, each
head-major (column = head * head_dim + k), so a block reshapes to (d_model, heads, head_dim);
the attention output c_proj's rows reshape to (heads, head_dim, d_model); lm_head is wte.
Nothing here imports transformers: the files are JSON and safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from harness.checkpoint import CheckpointError, open_regular, read_arrays, read_safetensors_header
from harness.storage import write_atomic
from tasks.layers import EMBEDDING_STD, LORA_TARGETS
from tasks.spec import TaskSpec

CONFIG, WEIGHTS = "config.json", "model.safetensors"
# Tasks a Hugging Face GPT-2 folder sizes (their builders' vocab, d_model, layers, heads, context).
HF_TASKS = ("gpt2", "gpt2-finetune")
ADAPTER_FOLDER, ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter", "adapter_config.json", "adapter_model.safetensors"
MAX_CONFIG_BYTES = 2**20  # GPT-2's config.json is under 1 kB
# The tanh GELU under its two Hugging Face names.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
PREFIX = "transformer."  # save_pretrained's names; the original GPT-2 upload has none
# Arrays a GPT-2 file may hold that carry no weights: the causal-mask buffers of older
# transformers, and lm_head (tied: wte itself).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class HFError(CheckpointError):
    """A Hugging Face folder that is not a GPT-2 tribench can map, or a task it does not fit."""


# -- config.json -----------------------------------------------------------------------------------

def is_hf_folder(path) -> bool:
    return Path(path).is_dir()


def read_config(folder: Path) -> dict:
    """config.json, checked to describe GPT-2 as tribench computes it; anything else is an HFError."""
    path = Path(folder) / CONFIG
    if not path.exists():
        raise HFError(f"{folder}: no {CONFIG}; a Hugging Face model folder has config.json and {WEIGHTS}")
    with os.fdopen(open_regular(path), "rb") as f:
        blob = f.read(MAX_CONFIG_BYTES + 1)
    if len(blob) > MAX_CONFIG_BYTES:
        raise HFError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(blob)
    except ValueError as exc:
        raise HFError(f"{path}: not JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise HFError(f"{path}: not a JSON object")
    checks = [
        ("model_type", cfg.get("model_type") == "gpt2", "gpt2"),
        ("activation_function", cfg.get("activation_function", "gelu_new") in TANH_GELUS, " or ".join(TANH_GELUS)),
        ("layer_norm_epsilon", cfg.get("layer_norm_epsilon", 1e-5) == 1e-5, "1e-05 (the spec's LayerNorm eps)"),
        ("n_inner", cfg.get("n_inner") in (None, 4 * (cfg.get("n_embd") or 0)), "null (4 x n_embd)"),
        ("tie_word_embeddings", cfg.get("tie_word_embeddings", True) is True, "true"),
        ("scale_attn_weights", cfg.get("scale_attn_weights", True) is True, "true"),
        ("scale_attn_by_inverse_layer_idx", cfg.get("scale_attn_by_inverse_layer_idx", False) is False, "false"),
    ]
    for key in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"):
        value = cfg.get(key)
        checks.append((key, isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 2**20,
                       "a positive int"))
    for key, ok, want in checks:
        if not ok:
            raise HFError(f"{path}: {key} is {cfg.get(key)!r}; tribench maps GPT-2 with {key} {want}")
    return cfg


def sizes_from_config(folder: Path) -> dict:
    """The gpt2 task's sizes a Hugging Face folder sets: its builder's arguments."""
    cfg = read_config(folder)
    return {"vocab": cfg["vocab_size"], "d_model": cfg["n_embd"], "layers": cfg["n_layer"], "heads": cfg["n_head"],
            "context": cfg["n_positions"]}


# -- the spec a folder fits ------------------------------------------------------------------------

# Fields that change how weights are drawn or adapted, not what the base model computes.
_NOT_THE_FUNCTION = {"kernel_init": "glorot_uniform", "init_std": EMBEDDING_STD, "out_init_std": EMBEDDING_STD,
                     "lora_rank": 0, "lora_alpha": 1.0, "lora_targets": LORA_TARGETS}


def _function_of(layer):
    changes = {k: v for k, v in _NOT_THE_FUNCTION.items() if hasattr(layer, k)}
    if layer.children():
        changes["body"] = tuple(_function_of(child) for child in layer.children())
    return dataclasses.replace(layer, **changes)


def check_gpt2_spec(spec: TaskSpec, where) -> tuple[int, int, int, int, int]:
    """(vocab, d_model, layers, heads, context) of a spec that computes GPT-2, else an HFError naming the layer."""
    from tasks.tiny_gpt import gpt_layers

    try:
        table = spec.layers[0]
        d, vocab, context = table.dim, table.vocab_size, spec.input_shape[0]
        n_layers = sum(layer.kind == "multiheadselfattention" for layer, _, _ in spec.walk())
        heads = next(layer.heads for layer, _, _ in spec.walk() if layer.kind == "multiheadselfattention")
        want = gpt_layers(d_model=d, layers=n_layers, heads=heads, context=context, vocab=vocab, gpt2=True)
    except (AttributeError, IndexError, StopIteration, ValueError):
        raise HFError(f"{where}: task {spec.name!r} is not a GPT-2 (the gpt2 task's layers)") from None
    from tasks.spec import walk

    mine = [layer for layer, _, _ in spec.walk() if not layer.children()]
    gpt = [layer for layer, _, _ in walk(want, spec.input_shape) if not layer.children()]
    if [layer.name for layer in mine] != [layer.name for layer in gpt]:
        raise HFError(f"{where}: task {spec.name!r} does not have GPT-2's layers ({', '.join(x.name for x in gpt[:4])}"
                      f", ...)")
    for got, expected in zip(mine, gpt):
        a, b = dataclasses.asdict(_function_of(got)), dataclasses.asdict(_function_of(expected))
        differ = [f"{k} {a[k]!r} (GPT-2: {b[k]!r})" for k in b if a.get(k) != b[k]]
        if differ:
            raise HFError(f"{where}: task {spec.name!r} is not GPT-2: layer {got.name!r} has {', '.join(differ)}")
    return vocab, d, n_layers, heads, context


def _blocks(d: int, heads: int) -> list[tuple[str, str, Callable, Callable]]:
    """Per block: (canonical param of block{i}, HF array of h.{i}, to canonical, to HF), in canonical order.

    to canonical takes the whole HF array and gives the canonical one; to HF takes the
    canonical arrays of the block (a dict by param name) and gives the HF array.
    """
    hd = d // heads
    qkv = ("query", "key", "value")

    def column(j):
        return lambda a: a[:, j * d:(j + 1) * d].reshape(d, heads, hd)

    def segment(j):
        return lambda a: a[j * d:(j + 1) * d].reshape(heads, hd)

    def packed(kind):
        if kind == "kernel":
            return lambda c: np.concatenate([c[f"attn_mhsa.{p}_kernel"].reshape(d, d) for p in qkv], axis=1)
        return lambda c: np.concatenate([c[f"attn_mhsa.{p}_bias"].reshape(d) for p in qkv])

    def same(ours, theirs):
        return ours, theirs, lambda a: a, lambda c: c[ours]

    norm, dense = (("scale", "weight"), ("offset", "bias")), (("kernel", "weight"), ("bias", "bias"))
    rows = [same(f"ln1.{p}", f"ln_1.{q}") for p, q in norm]
    for j, p in enumerate(qkv):
        rows += [(f"attn_mhsa.{p}_kernel", "attn.c_attn.weight", column(j), packed("kernel")),
                 (f"attn_mhsa.{p}_bias", "attn.c_attn.bias", segment(j), packed("bias"))]
    rows += [("attn_mhsa.out_kernel", "attn.c_proj.weight", lambda a: a.reshape(heads, hd, d),
              lambda c: c["attn_mhsa.out_kernel"].reshape(d, d)),
             same("attn_mhsa.out_bias", "attn.c_proj.bias")]
    for ours, theirs, pairs in (("ln2", "ln_2", norm), ("fc", "mlp.c_fc", dense), ("proj", "mlp.c_proj", dense)):
        rows += [same(f"{ours}.{p}", f"{theirs}.{q}") for p, q in pairs]
    return rows


def hf_shapes(vocab: int, d: int, n_layers: int, heads: int, n_positions: int) -> dict[str, tuple[int, ...]]:
    """Every array a GPT-2 model.safetensors holds (without PREFIX), with its shape."""
    per_block = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d),
                 "attn.c_attn.bias": (3 * d,), "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
                 "ln_2.weight": (d,), "ln_2.bias": (d,), "mlp.c_fc.weight": (d, 4 * d), "mlp.c_fc.bias": (4 * d,),
                 "mlp.c_proj.weight": (4 * d, d), "mlp.c_proj.bias": (d,)}
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (n_positions, d)}
    for i in range(n_layers):
        shapes.update({f"h.{i}.{k}": v for k, v in per_block.items()})
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


# -- in ------------------------------------------------------------------------------------------------

def load_hf_gpt2(folder: Path, spec: TaskSpec, *, seed: int = 0) -> list[np.ndarray]:
    """Canonical weights for `spec` from a Hugging Face GPT-2 folder.

    config.json must describe the spec's GPT-2 (its context may be shorter than n_positions:
    the first rows of wpe); every array's name, dtype and shape in model.safetensors is
    checked before any is read. LoRA adapters, which a base model has none of, start as
    the seed draws them (B = 0: they add nothing).
    """
    folder = Path(folder)
    cfg = read_config(folder)
    vocab, d, n_layers, heads, context = check_gpt2_spec(spec, folder)
    for key, value in (("vocab_size", vocab), ("n_embd", d), ("n_layer", n_layers), ("n_head", heads)):
        if cfg[key] != value:
            raise HFError(f"{folder / CONFIG}: {key} is {cfg[key]}, task {spec.name!r} has {value}")
    if context > cfg["n_positions"]:
        raise HFError(f"{folder / CONFIG}: n_positions {cfg['n_positions']} is shorter than the task's context "
                      f"{context}")
    want = hf_shapes(vocab, d, n_layers, heads, cfg["n_positions"])
    path = folder / WEIGHTS
    if not path.exists():
        raise HFError(f"{folder}: no {WEIGHTS} (tribench reads safetensors only, never pickled .bin weights)")
    with os.fdopen(open_regular(path), "rb") as f:
        _, arrays, start = read_safetensors_header(f, path)
        prefix = PREFIX if any(name.startswith(PREFIX) for name in arrays) else ""
        names = {}
        for name, (_, shape, _) in arrays.items():
            short = name[len(prefix):] if name.startswith(prefix) else name
            if short in want:
                if shape != want[short]:
                    raise HFError(f"{path}: {name} has shape {shape}, config.json makes it {want[short]}")
                names[short] = name
            elif not (short.endswith(IGNORED_SUFFIXES) or name == "lm_head.weight" and shape == want["wte.weight"]):
                raise HFError(f"{path}: an array {name} a GPT-2 does not have")
        missing = sorted(set(want) - set(names))
        if missing:
            raise HFError(f"{path}: no array {prefix}{missing[0]}")
        order = list(want)
        hf = dict(zip(order, read_arrays(f, path, arrays, start, [names[k] for k in order])))
    return canonical_from_hf(spec, hf, seed=seed)


def canonical_from_hf(spec: TaskSpec, hf: dict[str, np.ndarray], *, seed: int = 0) -> list[np.ndarray]:
    """Canonical arrays in spec order from GPT-2's arrays by name (without PREFIX): weights, or gradients alike."""
    from harness.weights import initial_weights

    _, d, n_layers, heads, context = check_gpt2_spec(spec, f"task {spec.name!r}")
    out = {"tok_emb.table": hf["wte.weight"], "pos_emb.table": hf["wpe.weight"][:context],
           "ln_f.scale": hf["ln_f.weight"], "ln_f.offset": hf["ln_f.bias"]}
    for i in range(n_layers):
        for ours, theirs, to_canonical, _ in _blocks(d, heads):
            out[f"block{i}_{ours}"] = to_canonical(hf[f"h.{i}.{theirs}"])
    fresh = None
    weights = []
    for index, entry in enumerate(spec.params()):
        if entry.name not in out:  # a LoRA adapter
            fresh = fresh if fresh is not None else initial_weights(spec, seed)
            weights.append(fresh[index])
        else:
            weights.append(np.ascontiguousarray(out[entry.name], np.float32))
    return weights


# -- out -----------------------------------------------------------------------------------------------

def hf_arrays(spec: TaskSpec, weights: list[np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, {HF name with PREFIX: array}) of canonical GPT-2 weights; LoRA adapters left out."""
    vocab, d, n_layers, heads, context = check_gpt2_spec(spec, f"task {spec.name!r}")
    by_name = dict(zip((e.name for e in spec.params()), weights))
    hf = {"wte.weight": by_name["tok_emb.table"], "wpe.weight": by_name["pos_emb.table"]}
    for i in range(n_layers):
        block = {name[len(f"block{i}_"):]: a for name, a in by_name.items() if name.startswith(f"block{i}_")}
        for _, theirs, _, to_hf in _blocks(d, heads):
            hf.setdefault(f"h.{i}.{theirs}", to_hf(block))
    hf.update({"ln_f.weight": by_name["ln_f.scale"], "ln_f.bias": by_name["ln_f.offset"]})
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "vocab_size": vocab, "n_embd": d, "n_layer": n_layers, "n_head": heads, "n_positions": context,
              "n_inner": None, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "scale_attn_weights": True,
              "initializer_range": 0.02,
              # tribench trains without dropout; Hugging Face's defaults are 0.1.
              "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    return config, {PREFIX + k: np.ascontiguousarray(v, np.float32) for k, v in hf.items()}


def _write_folder(out: Path, config: dict, config_name: str, arrays: dict, weights_name: str) -> None:
    from safetensors.numpy import save

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / config_name, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    # "pt": the format transformers and peft expect in a safetensors file's metadata.
    write_atomic(out / weights_name, save(arrays, metadata={"format": "pt"}))


def peft_adapter(spec: TaskSpec, weights: list[np.ndarray]) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(adapter_config.json, adapter arrays) of the spec's LoRA adapters as PEFT's LoRA on GPT-2; None without LoRA.

    PEFT adapts c_attn as one packed projection with one A: tribench's separate q, k, v
    adapters are the same function as a rank-(targets x r) A whose rows stack theirs and a
    block-diagonal B, with alpha scaled so that alpha / rank stays tribench's scale.
    """
    attention = [layer for layer, _, _ in spec.walk() if layer.kind == "multiheadselfattention"]
    if not attention or not attention[0].lora_rank:
        return None
    layer0 = attention[0]
    r, scale = layer0.lora_rank, layer0.lora_scale()
    if any((a.lora_rank, a.lora_alpha, a.lora_targets) != (r, layer0.lora_alpha, layer0.lora_targets)
           for a in attention):
        raise HFError(f"task {spec.name!r}: PEFT export needs one LoRA rank, alpha and targets for every block")
    _, d, n_layers, _, _ = check_gpt2_spec(spec, f"task {spec.name!r}")
    by_name = dict(zip((e.name for e in spec.params()), weights))
    packed = [t for t in ("query", "key", "value") if t in layer0.lora_targets]
    arrays, modules, rank_pattern, alpha_pattern = {}, [], {}, {}

    def lora(i, t, side):
        return by_name[f"block{i}_attn_mhsa.{t}_lora_{side}"]

    for i in range(n_layers):
        base = f"base_model.model.{PREFIX}h.{i}.attn"
        if packed:
            a = np.concatenate([lora(i, t, "a").T for t in packed])  # (len(packed) r, d): PEFT's lora_A (r, in)
            b = np.zeros((3 * d, len(packed) * r), np.float32)  # (out, r): each target's rows its own block
            for k, t in enumerate(packed):
                j = ("query", "key", "value").index(t)
                b[j * d:(j + 1) * d, k * r:(k + 1) * r] = lora(i, t, "b").reshape(r, d).T
            arrays[f"{base}.c_attn.lora_A.weight"], arrays[f"{base}.c_attn.lora_B.weight"] = a, b
        if "out" in layer0.lora_targets:
            arrays[f"{base}.c_proj.lora_A.weight"] = lora(i, "out", "a").reshape(d, r).T
            arrays[f"{base}.c_proj.lora_B.weight"] = lora(i, "out", "b").T
    if packed:
        modules.append("c_attn")
        rank_pattern["attn.c_attn"] = len(packed) * r
        alpha_pattern["attn.c_attn"] = scale * len(packed) * r
    if "out" in layer0.lora_targets:
        modules.append("c_proj")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "..",
              "target_modules": rf".*\.attn\.({'|'.join(modules)})", "r": r, "lora_alpha": scale * r,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "lora_dropout": 0.0,
              "fan_in_fan_out": True, "bias": "none", "inference_mode": True, "init_lora_weights": True}
    return config, {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}


def convert_to_hf(checkpoint: Path, out: Path) -> list[Path]:
    """Write a tribench GPT-2 checkpoint as a Hugging Face folder (and its LoRA adapters as a PEFT
    folder inside it, `adapter/`); returns the folders written."""
    from harness.checkpoint import load_checkpoint, saved_spec

    header, weights = load_checkpoint(checkpoint)
    spec = saved_spec(header, checkpoint)
    config, arrays = hf_arrays(spec, weights)
    adapter = peft_adapter(spec, weights)
    out = Path(out)
    _write_folder(out, config, CONFIG, arrays, WEIGHTS)
    written = [out]
    if adapter is not None:
        _write_folder(out / ADAPTER_FOLDER, adapter[0], ADAPTER_CONFIG, adapter[1], ADAPTER_WEIGHTS)
        written.append(out / ADAPTER_FOLDER)
    return written
