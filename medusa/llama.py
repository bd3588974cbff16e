"""A small Llama in PyTorch: the backbone Medusa verifies trees with.

gpt-fast-style (one readable file, no HF modeling code): the attention mask and positions are
*arguments* of ``forward``, so the same model runs causal prefill, one-token decoding and tree
verification.  The KV cache is preallocated for the whole budget and keeps its length on the
host: layers ``write`` pending entries, and the engine then ``commit``s them (plain decoding) or
``compact``s the accepted tree path into place (Medusa), so no device sync is needed to know it.
Weights come through the explicit HF->ours map in ``medusa.core.weights``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core.config import LlamaArgs, rope_inv_freq
from .core.models import ModelError, load_args
from .core.weights import is_backbone_tensor, our_state, weight_files

# ``mask`` value of a causal forward over an empty cache (prefill): SDPA's ``is_causal`` path, which
# never builds the [T, T] mask and lets the CPU flash kernel skip the masked half (a 1,000-token
# prefill: 28 -> 17 ms of attention per forward, measured in docs/performance.md)
CAUSAL = "causal"
Mask = Optional[Tensor | str]


class KVCache:
    """Keys/values for every layer: [layers, B, kv_heads, max_len, head_dim], host-side length.

    Decoding uses B = 1; batched plain decoding (self-distillation) keeps rows aligned by left padding.
    """

    def __init__(self, args: LlamaArgs, max_len: int, dtype: torch.dtype, device: torch.device | str,
                 batch: int = 1) -> None:
        shape = (args.num_layers, batch, args.num_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # committed entries; writes land at [length, length + T)

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store pending k, v [B, kv_heads, T, hd]; return views of committed + pending entries."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, n: int) -> None:
        """Keep the first n pending entries as they are (plain decoding / prefill)."""
        self.length += n

    def compact(self, nodes: Tensor) -> None:
        """Keep pending entries ``nodes`` (offsets from ``length``, increasing) and commit them in order."""
        n = nodes.shape[0]
        src = nodes + self.length
        for buf in (self.k, self.v):
            buf[:, :, :, self.length:self.length + n] = buf.index_select(3, src)
        self.length += n

    def keep_rows(self, rows: Tensor) -> None:
        """Batched decoding: drop finished sequences, keeping batch rows ``rows``."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]

    def reset(self) -> None:
        self.length = 0


class OneDNNLinear(nn.Module):
    """An inference-only nn.Linear whose weight is pre-packed (reordered once) for oneDNN.

    On CPUs, oneDNN with a pre-packed weight runs the small-batch matmuls of decoding far faster
    than the default sgemm; measured here over SmolLM2's 30 layers + lm_head in fp32: 1 row
    54 -> 29 ms, 8 rows 93 -> 26 ms.  That is what makes tree verification nearly free on a CPU.
    The op is the one PyTorch's own CPU compiler uses for frozen linears.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None),
                             persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def packed(linear: nn.Linear) -> nn.Module:
    """``linear`` as a OneDNNLinear where that helps (CPU, fp32 or bf16), else unchanged."""
    usable = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    w = linear.weight
    # oneDNN's bf16 path needs AVX512-BF16-class CPUs; elsewhere packing a bf16 weight raises
    bf16 = w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if usable and w.device.type == "cpu" and (w.dtype == torch.float32 or bf16):
        return OneDNNLinear(linear)
    return linear


def pack_linears(module: nn.Module) -> nn.Module:
    """Swap every nn.Linear inside ``module`` for its packed form (inference only)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, packed(child))
        else:
            pack_linears(child)
    return module


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # statistics in fp32 whatever the model dtype, as in the reference implementation
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE [arxiv 2104.09864], half-split layout as in HF checkpoints. x: [B, H, T, hd], cos/sin: [T, hd] or [B, 1, T, hd]."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=args.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask, cache: KVCache, layer: int) -> Tensor:
        """x: [B, T, h]; mask: [T, S] or [B, 1, T, S] bool (True = attend) over S = committed + T entries,
        None = attend to all, or CAUSAL (an empty cache: S = T)."""
        b, t = x.shape[:2]
        q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                      self.n_kv * self.head_dim], dim=-1)
        q = apply_rope(q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        keys, values = cache.write(layer, k, v)
        causal = isinstance(mask, str)
        if causal and keys.shape[2] != t:
            raise ValueError("a CAUSAL forward needs an empty cache")
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=None if causal else mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU [arxiv 2002.05202] with gate and up projections fused into one matmul."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.w13 = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.w2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask, cache: KVCache, layer: int) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        # tied models get the embedding matrix loaded here too (see weights.hf_weight_map)
        self.output = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.tensor(rope_inv_freq(args), dtype=torch.float32), persistent=False)

    def forward(self, tokens: Tensor, positions: Tensor, mask: Mask, cache: KVCache) -> Tensor:
        """tokens: [B, T], positions: [T] (or [B, T]) -> final-norm hidden states [B, T, h].

        Writes T pending entries into ``cache`` (committed by the caller). ``mask`` is [T, S] (or
        [B, 1, T, S]) bool with S = cache.length + T, None when every query may see every key, or CAUSAL
        (prefill of an empty cache).
        """
        freqs = positions.float()[..., None] * self.inv_freq  # [(B,) T, hd/2], fp32 for accuracy
        emb = torch.cat((freqs, freqs), dim=-1)
        if emb.dim() == 3:
            emb = emb[:, None]  # broadcast over heads
        x = self.tok_embeddings(tokens)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., h] -> logits [..., V] in fp32."""
        return self.output(hidden).float()


def load_llama(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", pack: bool = False) -> Transformer:
    """Build our Transformer from an HF directory (safetensors or .bin shards) through the weight map.

    ``pack`` prepares the linears for fast CPU inference (see OneDNNLinear); leave it off to train.
    """
    args = load_args(model_dir)
    with torch.device("meta"):
        model = Transformer(args)
    try:
        state = our_state(args, _read_hf_state(model_dir), model_dir, lambda parts: torch.cat(parts, dim=0))
    except ValueError as err:
        raise ModelError(str(err)) from err
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.inv_freq = torch.tensor(rope_inv_freq(args), dtype=torch.float32)
    model = model.to(device).eval()
    return pack_linears(model) if pack else model


def _read_hf_state(model_dir: Path) -> dict[str, Tensor]:
    """The backbone's HF tensors; extras such as Medusa-2 heads are never loaded (a 7B Medusa-2
    directory holds 1.5 GB of head weights in fp16)."""
    from safetensors import safe_open

    state: dict[str, Tensor] = {}
    for file in weight_files(model_dir):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if is_backbone_tensor(k)})
        else:
            loaded = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            state.update({k: v for k, v in loaded.items() if is_backbone_tensor(k)})
    return state
