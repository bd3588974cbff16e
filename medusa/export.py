"""Export trained Medusa heads for serving engines: ``python -m medusa.export --format vllm|medusa``.

Our heads are trained and served here on one device; at scale they run inside vLLM or
TensorRT-LLM, which load fixed layouts.  Both need a vocabulary projection *per head*, while our
heads may share the frozen base ``lm_head`` (``MedusaConfig.shared_lm_head``): then the base
model's output weights (``--model``, default: the heads' ``base_model_name_or_path``) are copied
into every head.  ``--heads`` takes every published layout ``core.checkpoint`` reads: a Medusa-1
heads directory (FasterDecoding's ``medusa_lm_head.pt`` / ``.safetensors``, or ours) or a
Medusa-2 model directory (heads inside the model's weights, which are then their base model).

``--format vllm`` writes what vLLM's Medusa speculator loads
(``vllm/model_executor/models/medusa.py``, config class ``vllm/transformers_utils/configs/medusa.py``)::

    config.json         model_type "medusa", num_heads, num_hidden_layers, hidden_size, vocab_size,
                        truncated_vocab_size (K with a token map, else vocab_size), medusa_fc_bias
                        (true: our ResBlocks have biases), original_lm_head (true when the heads
                        shared the base lm_head: vLLM versions that know it keep one copy)
    model.safetensors   blocks.{i}.layers.{j}.weight [h, h], blocks.{i}.layers.{j}.bias [h],
                        lm_heads.{i}.weight [K, h], and with a token map ``token_map`` [K] (int64):
                        vLLM scatters the K logits back to vocabulary ids (-inf elsewhere)

``--format medusa`` writes the original FasterDecoding layout (``medusa/core/checkpoint.py``) with
per-head lm_heads, which is what TensorRT-LLM's Medusa ``convert_checkpoint.py`` reads
(``{i}.{L}.weight``; ``--weights-format pt`` for FasterDecoding's own loader, which reads
``medusa_lm_head.pt``).  The files the heads' config names (tree, token map) and the per-backend
trees (``tree-NAME.json``) are copied beside it, so Jedusa loads the export as it loaded the heads.
Full-vocabulary lm_heads propose over the whole vocabulary; the token map stays for a later vLLM
export of the export.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .core.checkpoint import (CONFIG_NAME, WEIGHTS_PT, WEIGHTS_SAFETENSORS, CheckpointError, StateDict,
                              atomic_write_text, check_base_model, check_shapes, load_checkpoint, save_checkpoint)
from .core.config import MedusaConfig
from .core.token_map import read_token_map
from .core.models import ModelError, load_args, resolve_model
from .core.weights import hf_weight_map, weight_files

log = logging.getLogger("medusa.export")

FORMATS = ("vllm", "medusa")
DTYPES = {"float16": np.float16, "float32": np.float32}
WEIGHTS_FORMATS = {"safetensors": WEIGHTS_SAFETENSORS, "pt": WEIGHTS_PT}
VLLM_WEIGHTS = "model.safetensors"


def base_output_weight(model: str) -> np.ndarray:
    """The base model's output projection [V, h] (its embedding when the weights are tied), fp32."""
    model_dir = resolve_model(model)
    (name,) = hf_weight_map(load_args(model_dir))["output.weight"]
    for file in weight_files(model_dir):
        tensor = _read_tensor(file, name)
        if tensor is not None:
            return tensor
    raise ModelError(f"{model_dir}: weight {name} is missing from the checkpoint")


def _read_tensor(file: Path, name: str) -> Optional[np.ndarray]:
    import torch  # reads bf16 shards and .bin files, which numpy cannot

    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name).float().numpy() if name in f.keys() else None
    state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    return state[name].float().numpy() if name in state else None


def per_head_lm_heads(config: MedusaConfig, state: StateDict, base_lm_head: Optional[np.ndarray]) -> StateDict:
    """The checkpoint with every head's own lm_head ``{i}.{L}.weight``, copied from the base if shared."""
    if not config.shared_lm_head:
        return dict(state)
    if base_lm_head is None:
        raise ValueError("these heads share the base model's lm_head: pass --model so it can be copied into each head")
    out = dict(state)
    for i in range(config.medusa_num_heads):
        out[f"{i}.{config.medusa_num_layers}.weight"] = base_lm_head
    return out


def vllm_state(config: MedusaConfig, state: StateDict, token_map: Optional[np.ndarray] = None) -> StateDict:
    """Rename a per-head-lm_head checkpoint to vLLM's Medusa parameter names; with a token map the
    lm_heads keep its K rows and the map itself is saved as ``token_map``."""
    out: StateDict = {}
    for i in range(config.medusa_num_heads):
        for j in range(config.medusa_num_layers):
            out[f"blocks.{i}.layers.{j}.weight"] = state[f"{i}.{j}.linear.weight"]
            out[f"blocks.{i}.layers.{j}.bias"] = state[f"{i}.{j}.linear.bias"]
        lm_head = state[f"{i}.{config.medusa_num_layers}.weight"]
        out[f"lm_heads.{i}.weight"] = lm_head if token_map is None else lm_head[token_map]
    if token_map is not None:
        out["token_map"] = token_map.astype(np.int64)
    return out


def vllm_config(config: MedusaConfig, hidden_size: int, vocab_size: int, dtype: str,
                truncated_vocab_size: Optional[int] = None) -> dict[str, Any]:
    return {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "num_heads": config.medusa_num_heads,
        "num_hidden_layers": config.medusa_num_layers,
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
        "truncated_vocab_size": truncated_vocab_size or vocab_size,
        "medusa_fc_bias": True,
        "original_lm_head": config.shared_lm_head,
        "torch_dtype": dtype,
    }


def export(heads: Path, out: Path, fmt: str, model: Optional[str] = None, dtype: str = "float16",
           weights_format: str = "safetensors") -> Path:
    """Write ``heads`` to ``out`` in format ``fmt``; returns the weights file written."""
    _check_choices(fmt, dtype, weights_format)
    config, state = load_checkpoint(heads)
    if config.head_type != "medusa":  # vLLM's and TensorRT-LLM's Medusa layouts have no input projections
        raise CheckpointError(f"{heads}: {config.head_type} heads have no vLLM or TensorRT-LLM Medusa layout; "
                              "export Medusa heads, or serve these with python -m medusa.serve")
    token_map = read_token_map(heads, config)
    model = model or config.base_model_name_or_path or None
    base = None
    if config.shared_lm_head and model:
        check_base_model(config, model)
        base = base_output_weight(model)
    full = per_head_lm_heads(config, state, base)
    hidden_size, vocab_size = full[f"0.{config.medusa_num_layers}.weight"].shape[::-1]
    check_shapes(full, hidden_size, vocab_size)
    if token_map is not None and (token_map.min() < 0 or token_map.max() >= vocab_size):
        raise CheckpointError(f"{heads / str(config.token_map)}: token ids outside the vocabulary of {vocab_size}")
    full = {k: v.astype(DTYPES[dtype]) for k, v in full.items()}
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "vllm":
        return _write_vllm(out, config, full, token_map, dtype)
    return _write_medusa(heads, out, config, full, weights_format)


def _check_choices(fmt: str, dtype: str, weights_format: str) -> None:
    for what, value, choices in (("export format", fmt, FORMATS), ("dtype", dtype, DTYPES),
                                 ("weights format", weights_format, WEIGHTS_FORMATS)):
        if value not in choices:
            raise ValueError(f"unknown {what} {value!r}: use {' or '.join(choices)}")


def _write_vllm(out: Path, config: MedusaConfig, full: StateDict, token_map: Optional[np.ndarray], dtype: str) -> Path:
    from safetensors.numpy import save_file

    hidden_size, vocab_size = full[f"0.{config.medusa_num_layers}.weight"].shape[::-1]
    state = vllm_state(config, full, token_map)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(out / VLLM_WEIGHTS))
    truncated = None if token_map is None else len(token_map)
    atomic_write_text(out / CONFIG_NAME, _json(vllm_config(config, hidden_size, vocab_size, dtype, truncated)))
    return out / VLLM_WEIGHTS


def _write_medusa(heads: Path, out: Path, config: MedusaConfig, full: StateDict, weights_format: str) -> Path:
    save_checkpoint(out, replace(config, shared_lm_head=False), full, fmt=weights_format)
    _copy_beside(heads, out, config)
    if config.token_map:
        log.warning("per-head lm_heads project onto the full vocabulary: Jedusa and TensorRT-LLM propose over all "
                    "of it; %s is kept beside them for a --format vllm export of %s", config.token_map, out)
    return out / WEIGHTS_FORMATS[weights_format]


def _copy_beside(heads: Path, out: Path, config: MedusaConfig) -> None:
    """Copy the files the heads' config names (a tree file, the token map) and the trees measured per
    backend (``tree-NAME.json``), which the loaders look for beside the heads."""
    if heads.resolve() == out.resolve():
        return
    named = [n for n in (config.tree, config.token_map) if n and not Path(n).is_absolute() and (heads / n).is_file()]
    for name in named + sorted(f.name for f in heads.glob("tree-*.json")):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(heads / name, out / name)


def _json(body: dict[str, Any]) -> str:
    return json.dumps(body, indent=2) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export Medusa heads for vLLM (--format vllm) or TensorRT-LLM "
                                            "(--format medusa: FasterDecoding layout with per-head lm_heads)")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--heads", type=Path, required=True,
                   help="Medusa heads dir (ours / FasterDecoding .pt or .safetensors) or a Medusa-2 model dir")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--model", default=None,
                   help="base model (short name or HF dir) whose lm_head shared heads copy "
                        "(default: the heads' base_model_name_or_path)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16")
    p.add_argument("--weights-format", choices=list(WEIGHTS_FORMATS), default="safetensors",
                   help="--format medusa: medusa_lm_head.safetensors, or .pt (FasterDecoding's loader reads only .pt)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        written = export(args.heads, args.out, args.format, args.model, args.dtype, args.weights_format)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError and ModelError are ValueErrors
        log.error("%s", err)
        return 2
    log.info("wrote %s (%.1f MB) and %s", written, written.stat().st_size / 2**20, args.out / CONFIG_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
