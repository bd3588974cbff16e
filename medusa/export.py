"""Export trained Medusa heads for serving engines: ``python -m medusa.export --format vllm|medusa``.

Our heads are trained and served here on one device; at scale they run inside vLLM or
TensorRT-LLM, which load fixed layouts.  Both need a vocabulary projection *per head*, while our
heads may share the frozen base ``lm_head`` (``MedusaConfig.shared_lm_head``): then the base
model's output weights (``--model``, default: the heads' ``base_model_name_or_path``) are copied
into every head.

``--format vllm`` writes what vLLM's Medusa speculator loads
(``vllm/model_executor/models/medusa.py``, config class ``vllm/transformers_utils/configs/medusa.py``)::

    config.json         model_type "medusa", num_heads, num_hidden_layers, hidden_size, vocab_size,
                        truncated_vocab_size (= vocab_size: no token map), medusa_fc_bias (true:
                        our ResBlocks have biases), original_lm_head (true when the heads shared
                        the base lm_head: vLLM versions that know it keep one copy)
    model.safetensors   blocks.{i}.layers.{j}.weight [h, h], blocks.{i}.layers.{j}.bias [h],
                        lm_heads.{i}.weight [V, h]

``--format medusa`` writes the original FasterDecoding layout (``medusa/core/checkpoint.py``) with
per-head lm_heads, which is what TensorRT-LLM's Medusa ``convert_checkpoint.py`` reads
(``{i}.{L}.weight``); heads that already have their own lm_heads are in that layout as trained.
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

from .core.checkpoint import (CONFIG_NAME, StateDict, atomic_write_text, check_shapes, load_checkpoint,
                              save_checkpoint)
from .core.config import MedusaConfig
from .core.models import ModelError, load_args, resolve_model
from .core.weights import hf_weight_map, weight_files

log = logging.getLogger("medusa.export")

FORMATS = ("vllm", "medusa")
DTYPES = {"float16": np.float16, "float32": np.float32}
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


def vllm_state(config: MedusaConfig, state: StateDict) -> StateDict:
    """Rename a per-head-lm_head checkpoint to vLLM's Medusa parameter names."""
    out: StateDict = {}
    for i in range(config.medusa_num_heads):
        for j in range(config.medusa_num_layers):
            out[f"blocks.{i}.layers.{j}.weight"] = state[f"{i}.{j}.linear.weight"]
            out[f"blocks.{i}.layers.{j}.bias"] = state[f"{i}.{j}.linear.bias"]
        out[f"lm_heads.{i}.weight"] = state[f"{i}.{config.medusa_num_layers}.weight"]
    return out


def vllm_config(config: MedusaConfig, hidden_size: int, vocab_size: int, dtype: str) -> dict[str, Any]:
    return {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "num_heads": config.medusa_num_heads,
        "num_hidden_layers": config.medusa_num_layers,
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
        "truncated_vocab_size": vocab_size,
        "medusa_fc_bias": True,
        "original_lm_head": config.shared_lm_head,
        "torch_dtype": dtype,
    }


def export(heads: Path, out: Path, fmt: str, model: Optional[str] = None, dtype: str = "float16") -> Path:
    """Write ``heads`` to ``out`` in format ``fmt``; returns the weights file written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use {' or '.join(DTYPES)}")
    config, state = load_checkpoint(heads)
    model = model or config.base_model_name_or_path or None
    base = base_output_weight(model) if config.shared_lm_head and model else None
    full = per_head_lm_heads(config, state, base)
    hidden_size, vocab_size = full[f"0.{config.medusa_num_layers}.weight"].shape[::-1]
    check_shapes(full, hidden_size, vocab_size)
    full = {k: v.astype(DTYPES[dtype]) for k, v in full.items()}
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "vllm":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in vllm_state(config, full).items()}, str(out / VLLM_WEIGHTS))
        atomic_write_text(out / CONFIG_NAME, _json(vllm_config(config, hidden_size, vocab_size, dtype)))
        return out / VLLM_WEIGHTS
    written = save_checkpoint(out, replace(config, shared_lm_head=False), full)
    _copy_tree_file(heads, out, config.tree)
    return next(written.glob("medusa_lm_head.*"))


def _copy_tree_file(heads: Path, out: Path, tree: Optional[str]) -> None:
    """Keep a tree the heads' config names as a file beside them (e.g. tree.json from tree search)."""
    if tree and (heads / tree).is_file() and heads.resolve() != out.resolve():
        shutil.copy(heads / tree, out / tree)


def _json(body: dict[str, Any]) -> str:
    return json.dumps(body, indent=2) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export Medusa heads for vLLM (--format vllm) or TensorRT-LLM "
                                            "(--format medusa: FasterDecoding layout with per-head lm_heads)")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--heads", type=Path, required=True, help="Medusa checkpoint dir (ours / FasterDecoding format)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--model", default=None,
                   help="base model (short name or HF dir) whose lm_head shared heads copy "
                        "(default: the heads' base_model_name_or_path)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        written = export(args.heads, args.out, args.format, args.model, args.dtype)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError and ModelError are ValueErrors
        log.error("%s", err)
        return 2
    log.info("wrote %s (%.1f MB) and %s", written, written.stat().st_size / 2**20, args.out / CONFIG_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
