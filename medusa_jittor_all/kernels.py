"""The parts of the Jittor Llama written as C++ loop nests on the CPU: attention, RoPE + head
split, RMSNorm.  Each has a twin made of Jittor ops (``*_ops``): the CUDA path, and the kernel's
oracle in the tests.

Why: a decoding step of the op-graph model ran ~1,400-1,650 small kernels; Jittor's per-kernel
cost, not arithmetic, was a third of the step.  Attention alone was about ten kernels per layer
(a copy of the cache window, a key transpose, broadcast-multiply-reduce loops, softmax): per layer
at a 320-entry window 0.18 ms for one query, 0.27 for three, 0.32 for six and 6.8 ms for a
200-token prefill, against 0.03, 0.07, 0.15 and 2.0 ms for ``attend``'s loop nest.  RoPE (slices,
negation, concatenation, transposes) and RMSNorm (a reduction followed by four scalar kernels)
were ~20 more per layer; here each is one.

``jt.code`` compiles each kernel once: sizes are runtime values, so a growing window never
recompiles.  OpenMP spreads rows over the cores and -Ofast vectorises the inner loops.
``attend`` reads the cache buffers in place (no window copy), skips masked entries (the causal
half of a prefill costs nothing) and writes [B, T, heads * head_dim], the layout ``wo`` takes.
"""
from __future__ import annotations

from medusa_jittor.runtime import jt

HIDDEN = -1e29  # additive mask entries below this are skipped (the mask uses NEG_INF = -1e30)

_HEADER = "#include <algorithm>\n#include <cmath>\n#include <vector>"
_SRC = r"""
@alias(q, in0)
@alias(kc, in1)
@alias(vc, in2)
@alias(mask, in3)
@alias(y, out0)
const int B = q_shape0, NH = q_shape1, T = q_shape2, HD = q_shape3;
const int KV = kc_shape1, W = mask_shape1, G = NH / KV;
const float scale = 1.0f / std::sqrt((float)HD);
#pragma omp parallel for collapse(3)
for (int b = 0; b < B; b++)
for (int h = 0; h < NH; h++)
for (int t = 0; t < T; t++) {
    const q_type* qr = &@q(b, h, t, 0);
    const kc_type* keys = &@kc(b, h / G, 0, 0);
    const vc_type* values = &@vc(b, h / G, 0, 0);
    const mask_type* mr = &@mask(t, 0);
    std::vector<float> s(W), acc(HD, 0.f);
    float peak = HIDDEN;
    for (int w = 0; w < W; w++) {
        if (mr[w] < HIDDEN) { s[w] = HIDDEN; continue; }
        const kc_type* kr = keys + (size_t)w * HD;
        float dot = 0.f;
        for (int d = 0; d < HD; d++) dot += (float)qr[d] * (float)kr[d];
        s[w] = dot * scale + (float)mr[w];
        peak = std::max(peak, s[w]);
    }
    float total = 0.f;
    for (int w = 0; w < W; w++) {
        if (s[w] <= HIDDEN) continue;
        const float p = std::exp(s[w] - peak);
        total += p;
        const vc_type* vr = values + (size_t)w * HD;
        for (int d = 0; d < HD; d++) acc[d] += p * (float)vr[d];
    }
    q_type* out = &@y(b, t, h * HD);
    for (int d = 0; d < HD; d++) out[d] = total > 0.f ? acc[d] / total : 0.f;
}
""".replace("HIDDEN", f"({HIDDEN:.0e}f)")


_ROPE_SRC = r"""
@alias(qkv, in0)
@alias(cos, in1)
@alias(sin, in2)
@alias(q, out0)
@alias(k, out1)
@alias(v, out2)
const int B = qkv_shape0, T = qkv_shape1, NH = q_shape1, KV = k_shape1, HD = q_shape3, HALF = HD / 2;
#pragma omp parallel for collapse(3)
for (int b = 0; b < B; b++)
for (int t = 0; t < T; t++)
for (int h = 0; h < NH + 2 * KV; h++) {
    const qkv_type* x = &@qkv(b, t, h * HD);
    if (h >= NH + KV) {
        v_type* out = &@v(b, h - NH - KV, t, 0);
        for (int d = 0; d < HD; d++) out[d] = x[d];
        continue;
    }
    q_type* out = h < NH ? &@q(b, h, t, 0) : &@k(b, h - NH, t, 0);
    const cos_type* c = &@cos(t, 0);
    const sin_type* s = &@sin(t, 0);
    for (int d = 0; d < HALF; d++) {
        out[d] = x[d] * c[d] - x[d + HALF] * s[d];
        out[d + HALF] = x[d + HALF] * c[d + HALF] + x[d] * s[d + HALF];
    }
}
"""

_NORM_SRC = r"""
@alias(x, in0)
@alias(w, in1)
@alias(y, out0)
const int H = x_shape1;
#pragma omp parallel for
for (int r = 0; r < x_shape0; r++) {
    const x_type* row = &@x(r, 0);
    float sq = 0.f;
    for (int i = 0; i < H; i++) sq += (float)row[i] * (float)row[i];
    const float inv = 1.0f / std::sqrt(sq / H + EPS);
    y_type* out = &@y(r, 0);
    for (int i = 0; i < H; i++) out[i] = (y_type)((float)@w(i) * (float)(x_type)((float)row[i] * inv));
}
"""


def split_heads(qkv: jt.Var, cos: jt.Var, sin: jt.Var, n_heads: int, n_kv: int) -> tuple[jt.Var, jt.Var, jt.Var]:
    """Fused projection qkv [B, T, (H + 2 kv) * hd] -> q [B, H, T, hd], k, v [B, kv, T, hd], with RoPE
    (half-split layout as in HF checkpoints, cos/sin [T, hd]) applied to q and k."""
    if jt.flags.use_cuda:
        return split_heads_ops(qkv, cos, sin, n_heads, n_kv)
    b, t, width = qkv.shape
    hd = width // (n_heads + 2 * n_kv)
    shapes = [(b, n_heads, t, hd), (b, n_kv, t, hd), (b, n_kv, t, hd)]
    q, k, v = jt.code(shapes, [qkv.dtype] * 3, [qkv, cos, sin], cpu_src=_ROPE_SRC)
    return q, k, v


def split_heads_ops(qkv: jt.Var, cos: jt.Var, sin: jt.Var, n_heads: int, n_kv: int) -> tuple[jt.Var, jt.Var, jt.Var]:
    """``split_heads`` as Jittor ops."""
    b, t, width = qkv.shape
    hd = width // (n_heads + 2 * n_kv)
    heads = qkv.reshape(b, t, n_heads + 2 * n_kv, hd).transpose(0, 2, 1, 3)
    q, k, v = heads[:, :n_heads], heads[:, n_heads:n_heads + n_kv], heads[:, n_heads + n_kv:]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def rotate_half(x: jt.Var) -> jt.Var:
    half = x.shape[-1] // 2
    return jt.concat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: jt.Var, cos: jt.Var, sin: jt.Var) -> jt.Var:
    """RoPE [arxiv 2104.09864], half-split layout. x: [B, H, T, hd], cos/sin: [T, hd]."""
    return x * cos + rotate_half(x) * sin


def rms_norm(x: jt.Var, weight: jt.Var, eps: float) -> jt.Var:
    """RMSNorm over the last axis, statistics in fp32 whatever the dtype."""
    if jt.flags.use_cuda:
        return rms_norm_ops(x, weight, eps)
    rows = x.reshape(-1, x.shape[-1])
    src = _NORM_SRC.replace("EPS", f"{float(eps)!r}f")
    return jt.code(rows.shape, x.dtype, [rows, weight], cpu_header=_HEADER, cpu_src=src).reshape(x.shape)


def rms_norm_ops(x: jt.Var, weight: jt.Var, eps: float) -> jt.Var:
    """``rms_norm`` as Jittor ops."""
    x32 = x.float32()
    x32 = x32 * jt.rsqrt((x32 * x32).mean(-1, keepdims=True) + eps)
    return weight * x32.cast(x.dtype)


def attend(q: jt.Var, keys: jt.Var, values: jt.Var, mask: jt.Var) -> jt.Var:
    """q [B, H, T, hd] (rotated); keys, values: whole cache buffers [B, kv, L, hd] (GQA: query head
    h reads kv head h // (H / kv)); mask [T, W] additive over the first W entries -> [B, T, H * hd]."""
    if jt.flags.use_cuda:
        return attend_ops(q, keys, values, mask)
    b, h, t, hd = q.shape
    return jt.code((b, t, h * hd), q.dtype, [q, keys, values, mask], cpu_header=_HEADER, cpu_src=_SRC)


def attend_ops(q: jt.Var, keys: jt.Var, values: jt.Var, mask: jt.Var) -> jt.Var:
    """``attend`` as Jittor ops (the CUDA path, and the kernel's reference in tests)."""
    b, h, t, hd = q.shape
    kv, width = keys.shape[1], mask.shape[-1]
    group = h // kv
    q = q.reshape(b, kv, group * t, hd)
    scores = jt.matmul(q, keys[:, :, :width].transpose(0, 1, 3, 2)) * (hd ** -0.5)  # [B, kv, group*T, W]
    scores = scores.reshape(b, kv, group, t, width) + mask
    probs = jt.nn.softmax(scores.float32(), dim=-1).cast(q.dtype).reshape(b, kv, group * t, width)
    y = jt.matmul(probs, values[:, :, :width]).reshape(b, h, t, hd)
    return y.transpose(0, 2, 1, 3).reshape(b, t, h * hd)
