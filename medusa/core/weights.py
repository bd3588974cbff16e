"""The one HF -> Jedusa weight-name map, used by the PyTorch and the Jittor Llama alike.

Our models never import HF modeling code: they own their parameter names (fused ``wqkv`` and
``w13`` projections, which halve the matmul launches per layer) and this table says which HF
tensors, concatenated along dim 0, make each of ours.  Weight files are found here too, so
both frameworks read the same shards in the same way.  Tensors that are not the backbone's (a
Medusa-2 checkpoint keeps its heads, ``medusa_head.*``, in the model's own shards) are skipped by
the readers, and their names can be listed from the safetensors headers without reading data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from .config import LlamaArgs

WeightMap = dict[str, tuple[str, ...]]

# Tensors a published checkpoint may keep beside the backbone's; Medusa-2 saves its heads
# (``medusa_head.{i}.{j}...``) into the model's shards (FasterDecoding/Medusa, medusa_model.py).
NON_BACKBONE_PREFIXES = ("medusa_head.",)
HEADS_FILE_STEM = "medusa_lm_head"  # medusa_lm_head.safetensors / .pt: a Medusa-1 heads file


def is_backbone_tensor(name: str) -> bool:
    """False for the extras (Medusa-2 heads) a model directory may hold next to the backbone."""
    return not name.startswith(NON_BACKBONE_PREFIXES)


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
        # a Medusa-1 heads file beside the backbone is not one of its shards
        found = sorted(f for f in model_dir.glob(pattern) if not f.name.startswith(HEADS_FILE_STEM))
        if found:
            return found
    raise FileNotFoundError(f"{model_dir} has no model.safetensors or pytorch_model.bin weights")


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a .safetensors file (``__metadata__`` removed) and where its data starts.

    The format is 8 bytes of header length, a JSON header of {name: dtype, shape, data_offsets},
    then raw little-endian data, so no framework is needed to read it.
    """
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header, 8 + header_len


def read_safetensors(path: Path, keep: Optional[Callable[[str], bool]] = None) -> dict[str, np.ndarray]:
    """A .safetensors file as numpy arrays, memory-mapped; BF16 (which numpy lacks) widens to fp32.
    ``keep``: read only the tensors whose name it accepts."""
    header, start = safetensors_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
    out = {}
    for name, meta in header.items():
        if keep is not None and not keep(name):
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


def read_bin(path: Path, keep: Optional[Callable[[str], bool]] = None) -> dict[str, np.ndarray]:
    """A pickled PyTorch shard as numpy (imports torch); BF16 widens to fp32."""
    import torch

    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in _load_bin(path).items() if keep is None or keep(k)}


def _load_bin(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def read_hf_numpy(model_dir: Path, keep: Callable[[str], bool] = is_backbone_tensor) -> dict[str, np.ndarray]:
    """The HF weights of ``model_dir`` as numpy: by default the backbone's only (Medusa-2 heads are
    skipped).  Safetensors need no framework; ``.bin`` shards are pickled torch tensors, so reading
    them imports PyTorch (convert once to safetensors to avoid it)."""
    state: dict[str, np.ndarray] = {}
    for file in weight_files(model_dir):
        state.update(read_safetensors(file, keep) if file.suffix == ".safetensors" else read_bin(file, keep))
    return state


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Every tensor name in the model's weights -> the shard holding it, without reading tensor data:
    from the shard index, else the safetensors headers (an unindexed ``.bin`` is opened, mmap'd)."""
    files = weight_files(model_dir)
    index = model_dir / ("model.safetensors.index.json" if files[0].suffix == ".safetensors"
                         else "pytorch_model.bin.index.json")
    if index.is_file():
        return {k: model_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for file in files:
        names: Iterable[str] = safetensors_header(file)[0] if file.suffix == ".safetensors" else _load_bin(file)
        out.update((name, file) for name in names)
    return out


def read_tensors(files: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """The named tensors only (name -> shard, as from ``tensor_files``), each shard opened once."""
    wanted = set(files)
    state: dict[str, np.ndarray] = {}
    for file in sorted(set(files.values())):
        read = read_safetensors if file.suffix == ".safetensors" else read_bin
        state.update(read(file, wanted.__contains__))
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
