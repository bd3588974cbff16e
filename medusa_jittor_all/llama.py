"""A small Llama in Jittor: a name-for-name mirror of ``medusa/llama.py`` (``execute`` for ``forward``).

Same modules and parameter names (fused ``wqkv`` / ``w13``), same HF->ours weight map, so a
``diff`` against the PyTorch file shows only what Jittor needs differently:

- **Static shapes.** Jittor compiles one kernel per fused-op *structure* (sizes are runtime
  arguments), and an in-place ``setitem`` on a preallocated buffer costs only the written slice.
  So the KV cache is one fixed buffer per layer, attention always reads a window of it whose width
  moves in ``WINDOW``-token buckets, and the mask is an *additive* [T, W] float array that hides
  everything past the live entries.  Steady-state steps then run already-compiled kernels.
- **Attention is ours**: Jittor's ``scaled_dot_product_attention`` crashes on boolean masks.  On
  the CPU attention, RoPE + head split and RMSNorm are one hand-written kernel each
  (``kernels.py``): per-kernel cost, not arithmetic, dominated the op-graph version.

Weights are read as numpy (``medusa.core.weights``): safetensors need no PyTorch at all; only
``.bin`` shards and the one-time GGUF conversion of the embedded model use it.
"""
from __future__ import annotations

from pathlib import Path
import numpy as np

from medusa.core.config import LlamaArgs, rope_inv_freq
from medusa.core.models import ModelError, load_args
from medusa.core.weights import our_state, read_hf_numpy
from medusa_jittor.runtime import jt

from .kernels import attend, linear, rms_norm, split_heads, swiglu

nn = jt.nn
WINDOW = 32  # attention reads the cache in buckets of this many positions (sizes never trigger compiles)
NEG_INF = -1e30  # additive mask value: exp() underflows to exactly 0, no inf - inf NaNs


class KVCache:
    """Keys/values per layer, each [B, kv_heads, max_len, head_dim], updated in place; host-side length.

    ``write`` puts pending entries at [length, length + T); ``commit`` keeps them in order (plain
    decoding) and ``compact`` moves the accepted tree path into place (Medusa).  Entries past the
    length are stale but harmless: the step mask hides them.
    """

    def __init__(self, args: LlamaArgs, max_len: int, dtype: str = "float32", batch: int = 1) -> None:
        shape = (batch, args.num_kv_heads, max_len, args.head_dim)
        self.k = [jt.zeros(shape, dtype) for _ in range(args.num_layers)]
        self.v = [jt.zeros(shape, dtype) for _ in range(args.num_layers)]
        self.max_len = max_len
        self.length = 0
        jt.sync(self.k + self.v)

    def window(self, pending: int) -> int:
        """Width W of the attention window for a step writing ``pending`` entries (a WINDOW multiple)."""
        return min(self.max_len, -(-(self.length + pending) // WINDOW) * WINDOW)

    def write(self, layer: int, k: jt.Var, v: jt.Var) -> tuple[jt.Var, jt.Var]:
        """Store pending k, v [B, kv_heads, T, hd] in place; return the layer's whole buffers."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer], self.v[layer]

    def commit(self, n: int) -> None:
        self.length += n

    def compact(self, nodes: np.ndarray, width: int) -> None:
        """Keep pending entries ``nodes`` (offsets from ``length``, increasing) and commit them.

        Always moves ``width`` entries (``nodes`` padded with its last node) so the copy has one
        shape every step; the padding lands past the new length, where the mask hides it.  When the
        kept entries are already in place (nothing or only the first branch accepted) nothing moves.
        """
        n = len(nodes)
        if (nodes == np.arange(n)).all():
            self.length += n
            return
        src = jt.array(np.pad(nodes, (0, width - n), mode="edge").astype(np.int32) + self.length)
        for buf in self.k + self.v:
            buf[:, :, self.length:self.length + width] = buf[:, :, src]
        self.length += n
        jt.sync(self.k + self.v)

    def reset(self) -> None:
        self.length = 0


class Linear(nn.Linear):
    """``nn.Linear`` whose few-row products (decoding and tree steps) run ``kernels.linear``'s loop."""

    def execute(self, x: jt.Var) -> jt.Var:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = jt.ones(dim)

    def execute(self, x: jt.Var) -> jt.Var:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.wqkv = Linear(args.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=args.qkv_bias)
        self.wo = Linear(self.n_heads * self.head_dim, args.hidden_size, bias=args.o_bias)

    def execute(self, x: jt.Var, cos: jt.Var, sin: jt.Var, mask: jt.Var, cache: KVCache, layer: int) -> jt.Var:
        """x: [B, T, h]; mask: [T, W] additive (0 = attend, NEG_INF = hidden) over the cache window."""
        q, k, v = split_heads(self.wqkv(x), cos, sin, self.n_heads, self.n_kv)  # rotated, [B, heads, T, hd]
        keys, values = cache.write(layer, k, v)  # whole buffers [B, kv, L, hd]; the mask picks the window
        return self.wo(attend(q, keys, values, mask))


class FeedForward(nn.Module):
    """SwiGLU [arxiv 2002.05202] with gate and up projections fused into one matmul."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.w13 = Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.w2 = Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def execute(self, x: jt.Var) -> jt.Var:
        return self.w2(swiglu(self.w13(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.feed_forward = FeedForward(args)

    def execute(self, x: jt.Var, cos: jt.Var, sin: jt.Var, mask: jt.Var, cache: KVCache, layer: int) -> jt.Var:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList([TransformerBlock(args) for _ in range(args.num_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        # tied models get the embedding matrix loaded here too (see weights.hf_weight_map)
        self.output = Linear(args.hidden_size, args.vocab_size, bias=False)
        self._inv_freq = np.array(rope_inv_freq(args), dtype=np.float32)  # host constant, not a parameter

    def execute(self, tokens: jt.Var, positions: np.ndarray, mask: jt.Var, cache: KVCache) -> jt.Var:
        """tokens: [B, T], positions: [T] host ints -> final-norm hidden states [B, T, h].

        Writes T pending entries into ``cache`` (committed by the caller); ``mask`` is the step's
        additive [T, W] mask with W = ``cache.window(T)``, built once and shared by every layer.
        """
        freqs = positions.astype(np.float64)[:, None] * self._inv_freq  # [T, hd/2], host fp64 for accuracy
        emb = np.concatenate([freqs, freqs], axis=-1)
        x = self.tok_embeddings(tokens)
        cos, sin = jt.array(np.cos(emb).astype(np.float32)).cast(x.dtype), jt.array(np.sin(emb).astype(np.float32)).cast(x.dtype)
        mask = mask.cast(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        return self.norm(x)

    def logits(self, hidden: jt.Var) -> jt.Var:
        """hidden [..., h] -> logits [..., V] in fp32."""
        return self.output(hidden).float32()


def causal_mask(length: int, t: int, width: int) -> np.ndarray:
    """Additive [t, width] mask: query i sees the ``length`` committed entries and pending 0..i."""
    visible = np.arange(width)[None, :] <= length + np.arange(t)[:, None]
    return np.where(visible, 0.0, NEG_INF).astype(np.float32)


def load_llama(model_dir: Path, dtype: str = "float32") -> Transformer:
    """Build our Jittor Transformer from an HF directory through the shared weight map."""
    args = load_args(model_dir)
    model = Transformer(args)  # Jittor's initialisers are lazy: the random init never runs
    try:
        state = our_state(args, read_hf_numpy(model_dir), model_dir)
    except ValueError as err:
        raise ModelError(str(err)) from err
    own = set(model.state_dict())
    if own != set(state):
        raise ModelError(f"{model_dir}: weights and model disagree on {sorted(own ^ set(state))[0]!r}")
    model.load_state_dict({k: jt.array(np.ascontiguousarray(v, dtype=np.float32)).cast(dtype) for k, v in state.items()})
    model.eval()
    jt.sync(list(model.parameters()))
    return model


def hidden_states(model: Transformer, ids: list[int]) -> np.ndarray:
    """Final-norm hidden states [T, h] of one sequence (causal prefill), as fp32 numpy."""
    t = len(ids)
    cache = KVCache(model.args, t)
    with jt.no_grad():
        hidden = model(jt.array(np.array([ids], dtype=np.int32)), np.arange(t), jt.array(causal_mask(0, t, t)), cache)
    return hidden[0].float32().numpy()

