"""The parts of the Jittor Llama written as C++ loop nests on the CPU: attention, RoPE + head
split, RMSNorm, SwiGLU and the few-row linears.  Each has a twin made of Jittor ops (``*_ops``): the CUDA path, and the kernel's
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
``attend`` reads the cache buffers in place (no window copy), stops each query at its last visible
entry (the causal half of a prefill costs nothing) and writes [B, T, heads * head_dim], the layout
``wo`` takes.  The queries of one KV group (all its heads, ``QB`` positions) score ``KB`` keys at a
time against a transposed copy of that key block, so the inner loop is a vector FMA across keys
with independent accumulators instead of a dot product's serial sum (per layer on this 2-core CPU,
9 heads over 3 KV heads, head_dim 64: an 800-token prefill 43 -> 31 ms, 15 queries over 1,216
entries 2.0 -> 1.6 ms; one query 0.13 -> 0.2 ms).

``linear`` multiplies up to ``FEW_ROWS`` rows (a decoding or tree step) by a weight read once, four
output rows at a time; Jittor's matmul turns 2+ rows into a GEMM that costs ~1.5x one row here (the
lm_head: 7 ms for 1 row, 15 ms for 3), while this loop runs 3 rows in ~1.1x one row's time.  Longer
inputs (a prefill) use the GEMM.

All of them are written so that a row's result does not depend on the other rows: each key's
score is a dot product in one order, every score goes through the same exp (whole key blocks, in
64-byte aligned rows), the softmax and the value sum add key by key in cache order (a hidden entry
adds an exact 0), each linear output is one dot product whatever the row count, and RMSNorm, RoPE
and SwiGLU loop row by row (Jittor's fused SiLU runs one loop over all rows, so the tail columns
of one row took a scalar path and of several rows a vector one).  A node of a tree step (up to
``FEW_ROWS`` nodes) thus gets the logits of decoding its path token by token, bit for bit, on GCC's
code for this CPU (a test checks it): greedy Medusa is lossless by construction here, not by luck
of rounding.
"""
from __future__ import annotations

from medusa_jittor.runtime import jt

HIDDEN = -1e29  # additive mask entries below this are skipped (the mask uses NEG_INF = -1e30)

_HEADER = "#include <algorithm>\n#include <cmath>\n#include <cstdint>\n#include <vector>"
_ATTEND_SRC = r"""
@alias(q, in0)
@alias(kc, in1)
@alias(vc, in2)
@alias(mask, in3)
@alias(y, out0)
const int B = q_shape0, NH = q_shape1, T = q_shape2, HD = q_shape3;
const int KV = kc_shape1, W = mask_shape1, G = NH / KV;
constexpr int QB = 8, KB = 32;  // query positions per task, keys per transposed block
const int TB = (T + QB - 1) / QB;
const float scale = 1.0f / std::sqrt((float)HD);
#pragma omp parallel
{
const int WP = (W + KB - 1) / KB * KB;  // a score row's length, whole key blocks
std::vector<float> block((size_t)HD * KB), scores((size_t)G * QB * WP + 16), acc(HD);
// rows 64-byte aligned, whatever the allocator gives: no loop gets peeled at a varying point
float* s = (float*)(((std::uintptr_t)scores.data() + 63) & ~(std::uintptr_t)63);
int ends[QB];
#pragma omp for collapse(3) schedule(dynamic, 1)
for (int b = 0; b < B; b++)
for (int g = 0; g < KV; g++)
for (int tb = 0; tb < TB; tb++) {
    const int t0 = tb * QB, nq = std::min(QB, T - t0);
    int last = 0;  // past the last entry any of these queries sees
    for (int i = 0; i < nq; i++) {
        const mask_type* mr = &@mask(t0 + i, 0);
        int e = W;
        while (e > 0 && mr[e - 1] < HIDDEN) e--;
        ends[i] = e;
        last = std::max(last, e);
    }
    const kc_type* keys = &@kc(b, g, 0, 0);
    const vc_type* values = &@vc(b, g, 0, 0);
    float* kt = block.data();
    for (int w0 = 0; w0 < last; w0 += KB) {
        const int wn = std::min(KB, W - w0);
        for (int j = 0; j < KB; j++)  // kt[d][j] = key w0 + j, dimension d
            for (int d = 0; d < HD; d++)
                kt[d * KB + j] = j < wn ? (float)keys[(size_t)(w0 + j) * HD + d] : 0.f;
        for (int hh = 0; hh < G; hh++)
        for (int i = 0; i < nq; i++) {
            if (w0 >= ends[i]) continue;
            const q_type* qr = &@q(b, g * G + hh, t0 + i, 0);
            float dots[KB];
            for (int j = 0; j < KB; j++) dots[j] = 0.f;
            for (int d = 0; d < HD; d++) {
                const float qd = (float)qr[d];
                const float* kd = kt + d * KB;
                for (int j = 0; j < KB; j++) dots[j] += qd * kd[j];
            }
            float* sr = &s[(size_t)(hh * QB + i) * WP + w0];
            const mask_type* mr = &@mask(t0 + i, w0);
            for (int j = 0; j < wn; j++) sr[j] = dots[j] * scale + (float)mr[j];
        }
    }
    for (int hh = 0; hh < G; hh++)
    for (int i = 0; i < nq; i++) {  // softmax over the visible span (hidden entries underflow to 0)
        const int e = ends[i], padded = (e + KB - 1) / KB * KB;
        float* sr = &s[(size_t)(hh * QB + i) * WP];
        float peak = HIDDEN;
        for (int w = 0; w < e; w++) peak = std::max(peak, sr[w]);
        for (int w = e; w < padded; w++) sr[w] = HIDDEN;
        for (int w0 = 0; w0 < padded; w0 += KB)  // whole blocks: every score takes the same exp path
            for (int j = 0; j < KB; j++) sr[w0 + j] = std::exp(sr[w0 + j] - peak);
        float total = 0.f;  // summed key by key, in order: the same sum whatever T and the row's place
        float* out_acc = acc.data();
        for (int d = 0; d < HD; d++) out_acc[d] = 0.f;
        for (int w = 0; w < e; w++) {
            const float p = sr[w];
            total += p;
            const vc_type* vr = values + (size_t)w * HD;
            for (int d = 0; d < HD; d++) out_acc[d] += p * (float)vr[d];
        }
        q_type* out = &@y(b, t0 + i, (g * G + hh) * HD);
        const float inv = total > 0.f ? 1.f / total : 0.f;
        for (int d = 0; d < HD; d++) out[d] = out_acc[d] * inv;
    }
}
}
""".replace("HIDDEN", f"({HIDDEN:.0e}f)")


# Rows up to which ``linear`` runs its own loop nest: measured faster up to 32 here, and the bound of
# the bit-for-bit guarantee (a longer tree's linears run as a GEMM, whose rounding depends on T).
FEW_ROWS = 32

_LINEAR_SRC = r"""
@alias(x, in0)
@alias(w, in1)
@alias(y, out0)
const int R = x_shape0, K = x_shape1, O = w_shape0;
#pragma omp parallel for schedule(static)
for (int o0 = 0; o0 < O; o0 += 4) {
    if (o0 + 4 > O) {  // the last outputs when O is no multiple of 4, one at a time
        for (int o = o0; o < O; o++)
            for (int r = 0; r < R; r++) {
                float acc = 0.f;
                for (int k = 0; k < K; k++) acc += (float)@x(r, k) * (float)@w(o, k);
                @y(r, o) = acc;
            }
        continue;
    }
    const w_type* w0 = &@w(o0, 0);
    const w_type* w1 = w0 + K;
    const w_type* w2 = w1 + K;
    const w_type* w3 = w2 + K;
    for (int r = 0; r < R; r++) {
        const x_type* xr = &@x(r, 0);
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        for (int k = 0; k < K; k++) {
            const float xk = (float)xr[k];
            a0 += xk * (float)w0[k];
            a1 += xk * (float)w1[k];
            a2 += xk * (float)w2[k];
            a3 += xk * (float)w3[k];
        }
        y_type* yr = &@y(r, o0);
        yr[0] = a0;
        yr[1] = a1;
        yr[2] = a2;
        yr[3] = a3;
    }
}
"""


_SWIGLU_SRC = r"""
@alias(gu, in0)
@alias(y, out0)
const int R = gu_shape0, I = y_shape1;
#pragma omp parallel for
for (int r = 0; r < R; r++) {  // row by row: a column takes the same exp path whatever R
    const gu_type* gate = &@gu(r, 0);
    const gu_type* up = gate + I;
    y_type* out = &@y(r, 0);
    for (int c = 0; c < I; c++) {
        const float g = (float)gate[c];
        out[c] = (y_type)(g / (1.f + std::exp(-g)) * (float)up[c]);
    }
}
"""

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
    return jt.code((b, t, h * hd), q.dtype, [q, keys, values, mask], cpu_header=_HEADER, cpu_src=_ATTEND_SRC)


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


def linear(x: jt.Var, weight: jt.Var, bias: jt.Var | None = None) -> jt.Var:
    """x [..., K] @ weight [O, K]^T (+ bias) -> [..., O]; up to ``FEW_ROWS`` rows on the CPU in the
    loop nest, otherwise (and on CUDA) as Jittor's matmul."""
    rows = x.reshape(-1, x.shape[-1])
    if jt.flags.use_cuda or rows.shape[0] > FEW_ROWS:
        y = jt.nn.matmul_transpose(rows, weight)
    else:
        y = jt.code((rows.shape[0], weight.shape[0]), x.dtype, [rows, weight], cpu_src=_LINEAR_SRC)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


def swiglu(gate_up: jt.Var) -> jt.Var:
    """[..., 2 I] (gate then up, as ``w13`` writes them) -> silu(gate) * up [..., I]."""
    inter = gate_up.shape[-1] // 2
    if jt.flags.use_cuda:
        return swiglu_ops(gate_up)
    rows = gate_up.reshape(-1, 2 * inter)
    y = jt.code((rows.shape[0], inter), gate_up.dtype, [rows], cpu_header=_HEADER, cpu_src=_SWIGLU_SRC)
    return y.reshape(*gate_up.shape[:-1], inter)


def swiglu_ops(gate_up: jt.Var) -> jt.Var:
    """``swiglu`` as Jittor ops (one fused loop over all rows: a column's rounding depends on their number)."""
    inter = gate_up.shape[-1] // 2
    return jt.nn.silu(gate_up[..., :inter]) * gate_up[..., inter:]
