"""The one HF -> Jedusa weight-name map, used by the PyTorch and the Jittor Llama alike.

Our models never import HF modeling code: they own their parameter names (fused ``wqkv`` and
``w13`` projections, which halve the matmul launches per layer) and this table says which HF
tensors, concatenated along dim 0, make each of ours.  Weight files are found here too, so
both frameworks read the same shards in the same way.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .config import LlamaArgs

WeightMap = dict[str, tuple[str, ...]]


def hf_weight_map(args: LlamaArgs) -> WeightMap:
    """Our parameter name -> the HF names whose dim-0 concatenation it is."""
    out: WeightMap = {"tok_embeddings.weight": ("model.embed_tokens.weight",), "norm.weight": ("model.norm.weight",)}
    # tied embeddings: our output projection is its own copy, so it can be packed for fast matmuls
    out["output.weight"] = ("model.embed_tokens.weight",) if args.tie_word_embeddings else ("lm_head.weight",)
    for i in range(args.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        out[ours + "attention_norm.weight"] = (hf + "input_layernorm.weight",)
        out[ours + "ffn_norm.weight"] = (hf + "post_attention_layernorm.weight",)
        out[ours + "attention.wqkv.weight"] = tuple(attn + f"{p}_proj.weight" for p in "qkv")
        out[ours + "attention.wo.weight"] = (attn + "o_proj.weight",)
        out[ours + "feed_forward.w13.weight"] = (mlp + "gate_proj.weight", mlp + "up_proj.weight")
        out[ours + "feed_forward.w2.weight"] = (mlp + "down_proj.weight",)
        if args.qkv_bias:
            out[ours + "attention.wqkv.bias"] = tuple(attn + f"{p}_proj.bias" for p in "qkv")
        if args.o_bias:
            out[ours + "attention.wo.bias"] = (attn + "o_proj.bias",)
        if args.mlp_bias:
            out[ours + "feed_forward.w13.bias"] = (mlp + "gate_proj.bias", mlp + "up_proj.bias")
            out[ours + "feed_forward.w2.bias"] = (mlp + "down_proj.bias",)
    return out


def weight_files(model_dir: Path) -> list[Path]:
    """The model's weight shards: safetensors preferred, PyTorch .bin otherwise."""
    for index_name, single, pattern in (
        ("model.safetensors.index.json", "model.safetensors", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"),
    ):
        index = model_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [model_dir / s for s in shards]
        if (model_dir / single).is_file():
            return [model_dir / single]
        found = sorted(model_dir.glob(pattern))
        if found:
            return found
    raise FileNotFoundError(f"{model_dir} has no model.safetensors or pytorch_model.bin weights")


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A .safetensors file as numpy arrays, memory-mapped; BF16 (which numpy lacks) widens to fp32.

    The format is 8 bytes of header length, a JSON header of {name: dtype, shape, data_offsets},
    then raw little-endian data, so no framework is needed to read it.
    """
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        chunk = raw[begin:end]
        if meta["dtype"] == "BF16":
            array = (chunk.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif meta["dtype"] in SAFETENSORS_DTYPES:
            array = chunk.view(SAFETENSORS_DTYPES[meta["dtype"]])
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        out[name] = array.reshape(meta["shape"])
    return out


def read_hf_numpy(model_dir: Path) -> dict[str, np.ndarray]:
    """All HF weights of ``model_dir`` as numpy. Safetensors need no framework; ``.bin`` shards are
    pickled torch tensors, so reading them imports PyTorch (convert once to safetensors to avoid it)."""
    state: dict[str, np.ndarray] = {}
    for file in weight_files(model_dir):
        if file.suffix == ".safetensors":
            state.update(read_safetensors(file))
        else:
            import torch

            loaded = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            state.update({k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in loaded.items()})
    return state


def our_state(args: LlamaArgs, hf: Mapping[str, Any], where: Path,
              concat: Callable[[list[Any]], Any] = lambda parts: np.concatenate(parts, axis=0)) -> dict[str, Any]:
    """HF tensors -> our names, fused projections concatenated along dim 0 by ``concat`` (numpy by
    default; the PyTorch model passes ``torch.cat``); a missing tensor is named in the error."""
    state = {}
    for ours, names in hf_weight_map(args).items():
        missing = [n for n in names if n not in hf]
        if missing:
            raise ValueError(f"{where}: weight {missing[0]} is missing from the checkpoint")
        state[ours] = concat([hf[n] for n in names]) if len(names) > 1 else hf[names[0]]
    return state
