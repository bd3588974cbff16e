"""The one HF -> Jedusa weight-name map, used by the PyTorch and the Jittor Llama alike.

Our models never import HF modeling code: they own their parameter names (fused ``wqkv`` and
``w13`` projections, which halve the matmul launches per layer) and this table says which HF
tensors, concatenated along dim 0, make each of ours.  Weight files are found here too, so
both frameworks read the same shards in the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

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
