//! The CUDA backend's kernels, as CUDA C sources that NVRTC compiles once per process.
//!
//! Everything that is not a matrix product (those go to cuBLAS) is one of these small kernels.
//! Each mirrors a CPU operation — its *CPU twin*, named in [`KERNELS`] — operation for
//! operation in f32 (f64 where the CPU uses f64: the loss), so that the GPU results can be
//! checked against the CPU backend: GELU uses torch's own erf formula as `backend::cpu` does,
//! the loss is the f64 log-softmax of `task::loss`, AdamW is `train::adamw`'s update.
//!
//! The sources are plain data (no `cuda` feature needed): `tests/cuda_kernels.rs` compiles every
//! one to PTX for sm_90 with NVRTC, a host-only library, on machines without a GPU.
//!
//! Status: the kernels and their compile check exist; the `Cuda` backend that launches them
//! (cuBLAS products, the Backend/Differentiable operations, graphs, many runs at once) is not
//! written yet.

/// One kernel: its name (the `extern "C"` symbol), what it computes, and its CPU twin.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// The `extern "C" __global__` function name.
    pub name: &'static str,
    /// The CPU function whose arithmetic it reproduces.
    pub cpu_twin: &'static str,
}

/// Every kernel in [`SOURCE`].
pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "embed_gather",
        cpu_twin: "Cpu::embed",
    },
    Kernel {
        name: "embed_scatter_add",
        cpu_twin: "Differentiable::embed_backward (Cpu)",
    },
    Kernel {
        name: "pos_embed",
        cpu_twin: "Cpu::pos_embed",
    },
    Kernel {
        name: "act_forward",
        cpu_twin: "Cpu::activate_rows (relu, gelu, gelu_new, silu)",
    },
    Kernel {
        name: "act_backward",
        cpu_twin: "Differentiable::activation_backward (Cpu)",
    },
    Kernel {
        name: "scores_scale_mask",
        cpu_twin: "Cpu::attn_scores (division and mask)",
    },
    Kernel {
        name: "softmax_rows",
        cpu_twin: "Cpu::softmax",
    },
    Kernel {
        name: "softmax_rows_backward",
        cpu_twin: "Differentiable::softmax_backward (Cpu)",
    },
    Kernel {
        name: "normalize_rows",
        cpu_twin: "Cpu::normalize",
    },
    Kernel {
        name: "normalize_rows_backward",
        cpu_twin: "Differentiable::normalize_backward (Cpu)",
    },
    Kernel {
        name: "column_sums",
        cpu_twin: "Differentiable::sum_leading (Cpu)",
    },
    Kernel {
        name: "last_position_loss",
        cpu_twin: "task::row_loss (cross-entropy, StableMax)",
    },
    Kernel {
        name: "adamw_step",
        cpu_twin: "train::AdamW::step",
    },
    Kernel {
        name: "grokfast_ema",
        cpu_twin: "train::Filters (Grokfast EMA)",
    },
];

/// The CUDA C source of every kernel in [`KERNELS`] (one translation unit).
pub const SOURCE: &str = r#"
// Activation kinds (backend::Activation): 0 relu, 1 gelu (exact, torch's erf formula),
// 2 gelu_new / gelu_fast / gelu_pytorch_tanh, 3 silu.

__device__ __forceinline__ float erf_torch(float x) {
    // torch's Vectorized<float>::erf: Abramowitz-Stegun 7.1.26 with fused multiply-adds.
    float a = fabsf(x);
    float t = 1.0f / fmaf(0.3275911f, a, 1.0f);
    float r = fmaf(fmaf(fmaf(fmaf(1.061405429f, t, -1.453152027f), t, 1.421413741f), t,
                        -0.284496736f), t, 0.254829592f);
    float e = expf(-(x * x));
    return copysignf(fmaf(-e * t, r, 1.0f), x);
}

__device__ __forceinline__ float act_f(float x, int kind) {
    switch (kind) {
    case 0: return x > 0.0f ? x : (x != x ? x : 0.0f);
    case 1: return x * 0.5f * (1.0f + erf_torch(x * 0.70710678118654752f));
    case 2: {
        const float c = 0.7978845608028654f;
        return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
    }
    default: return x / (1.0f + expf(-x));
    }
}

__device__ __forceinline__ float act_d(float x, int kind) {
    switch (kind) {
    case 0: return x > 0.0f ? 1.0f : 0.0f;
    case 1: {
        const float beta = 0.3989422804014327f; // 2/sqrt(pi) * sqrt(1/2) * 0.5
        float cdf = 0.5f * (1.0f + erf_torch(x * 0.70710678118654752f));
        float pdf = beta * expf(x * x * -0.5f);
        return cdf + x * pdf;
    }
    case 2: {
        const float c = 0.7978845608028654f;
        float t = tanhf(c * (x + 0.044715f * x * x * x));
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * x * x);
    }
    default: {
        float s = 1.0f / (1.0f + expf(-x));
        return s * (1.0f + x * (1.0f - s));
    }
    }
}

// out[r, :] = w[tokens[r], :] for r < rows (tokens flattened [B*P]).
extern "C" __global__ void embed_gather(const float* w, const unsigned* tokens, float* out,
                                        int rows, int d) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * d) return;
    long r = i / d, c = i % d;
    out[i] = w[(long)tokens[r] * d + c];
}

// gw[tokens[r], :] += g[r, :] (the embedding's gradient).
extern "C" __global__ void embed_scatter_add(const float* g, const unsigned* tokens, float* gw,
                                             int rows, int d) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * d) return;
    long r = i / d, c = i % d;
    atomicAdd(&gw[(long)tokens[r] * d + c], g[i]);
}

// x[b, p, :] += w_pos[p, :].
extern "C" __global__ void pos_embed(float* x, const float* w_pos, int batch, int pos, int d) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)batch * pos * d) return;
    x[i] += w_pos[i % ((long)pos * d)];
}

extern "C" __global__ void act_forward(const float* x, float* y, long n, int kind) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = act_f(x[i], kind);
}

// dx = g * act'(x) (torch: dy * (cdf + x * pdf) for gelu).
extern "C" __global__ void act_backward(const float* x, const float* g, float* dx, long n, int kind) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dx[i] = g[i] * act_d(x[i], kind);
}

// scores [B, H, Pq, Pk] from the batched product q.k: divided by scale (a true division, as TL),
// keys after the query (query i at Pk - Pq + i) set to `ignore` when causal.
extern "C" __global__ void scores_scale_mask(float* s, long n, int pq, int pk, float scale,
                                             int causal, float ignore) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int j = (int)(i % pk), q = (int)((i / pk) % pq);
    s[i] = (causal && j > q + (pk - pq)) ? ignore : s[i] / scale;
}

// Row softmax, max-subtracted, NaN -> 0 (fully masked rows), one thread per row.
extern "C" __global__ void softmax_rows(const float* x, float* y, long rows, int k) {
    long r = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* s = x + r * k;
    float* o = y + r * k;
    float m = __int_as_float(0xff800000); // -inf
    for (int j = 0; j < k; j++) m = fmaxf(m, s[j]);
    float sum = 0.0f;
    for (int j = 0; j < k; j++) { o[j] = expf(s[j] - m); sum += o[j]; }
    for (int j = 0; j < k; j++) { float v = o[j] / sum; o[j] = v != v ? 0.0f : v; }
}

// dx = y * (g - sum(g * y)) per row.
extern "C" __global__ void softmax_rows_backward(const float* y, const float* g, float* dx,
                                                 long rows, int k) {
    long r = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float dot = 0.0f;
    for (int j = 0; j < k; j++) dot += y[r * k + j] * g[r * k + j];
    for (int j = 0; j < k; j++) dx[r * k + j] = y[r * k + j] * (g[r * k + j] - dot);
}

// LayerNorm / RMSNorm without the affine part: y = (x - mean) / sqrt(mean((x - mean)^2) + eps)
// (no centring for RMS); one warp per row, scale[r] saved for the backward pass.
extern "C" __global__ void normalize_rows(const float* x, float* y, float* scale, long rows,
                                          int k, int center, float eps) {
    long r = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const float* s = x + r * k;
    float sum = 0.0f;
    for (int j = lane; j < k; j += 32) sum += s[j];
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    float mean = center ? sum / k : 0.0f;
    float ss = 0.0f;
    for (int j = lane; j < k; j += 32) { float v = s[j] - mean; ss += v * v; }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    float sc = sqrtf(ss / k + eps);
    for (int j = lane; j < k; j += 32) y[r * k + j] = (s[j] - mean) / sc;
    if (lane == 0) scale[r] = sc;
}

// dx = (g - mean(g) - y * mean(g * y)) / scale (no mean(g) term without centring).
extern "C" __global__ void normalize_rows_backward(const float* y, const float* scale,
                                                   const float* g, float* dx, long rows, int k,
                                                   int center) {
    long r = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    float sg = 0.0f, sgy = 0.0f;
    for (int j = lane; j < k; j += 32) { sg += g[r * k + j]; sgy += g[r * k + j] * y[r * k + j]; }
    for (int o = 16; o > 0; o >>= 1) {
        sg += __shfl_xor_sync(0xffffffff, sg, o);
        sgy += __shfl_xor_sync(0xffffffff, sgy, o);
    }
    float mg = center ? sg / k : 0.0f, mgy = sgy / k, sc = scale[r];
    for (int j = lane; j < k; j += 32)
        dx[r * k + j] = (g[r * k + j] - mg - y[r * k + j] * mgy) / sc;
}

// out[c] = sum_r g[r, c] (bias gradients), one thread per column, rows in order.
extern "C" __global__ void column_sums(const float* g, float* out, long rows, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (long r = 0; r < rows; r++) s += g[r * cols + c];
    out[c] = s;
}

__device__ __forceinline__ void stablemax_s(double x, double* s, double* ds) {
    if (x >= 0.0) { *s = x + 1.0; *ds = 1.0; } else { double r = 1.0 / (1.0 - x); *s = r; *ds = r * r; }
}

// The loss at the last position of logits [N, P, V], in f64: per row the negative
// log-likelihood (kind 0: log-softmax; 1: StableMax) and its gradient times inv_n, cast to f32
// (zero at the other positions: grad must be zeroed first). One thread per row.
extern "C" __global__ void last_position_loss(const float* logits, const unsigned* labels,
                                              double* row_loss, float* grad, long n, int pos,
                                              int v, double inv_n, int kind) {
    long r = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) return;
    const float* x = logits + (r * pos + pos - 1) * v;
    float* g = grad + (r * pos + pos - 1) * v;
    int y = labels[r];
    if (kind == 0) {
        double m = __longlong_as_double(0xfff0000000000000ULL); // -inf
        for (int j = 0; j < v; j++) m = fmax(m, (double)x[j]);
        double sum = 0.0;
        for (int j = 0; j < v; j++) sum += exp((double)x[j] - m);
        double lse = m + log(sum);
        for (int j = 0; j < v; j++) {
            double p = exp((double)x[j] - m) / sum;
            g[j] = (float)((p - (j == y ? 1.0 : 0.0)) * inv_n);
        }
        row_loss[r] = lse - (double)x[y];
    } else {
        double total = 0.0, s, ds;
        for (int j = 0; j < v; j++) { stablemax_s((double)x[j], &s, &ds); total += s; }
        double sy, dsy;
        stablemax_s((double)x[y], &sy, &dsy);
        for (int j = 0; j < v; j++) {
            stablemax_s((double)x[j], &s, &ds);
            double d = ds / total - (j == y ? dsy / sy : 0.0);
            g[j] = (float)(d * inv_n);
        }
        row_loss[r] = log(total) - log(sy);
    }
}

// torch.optim.AdamW (single-tensor path) over one flat buffer of every trained parameter.
extern "C" __global__ void adamw_step(float* p, float* m, float* v, const float* g, long n,
                                      float decay, float w1, float b2, float w2, float step_size,
                                      float bc2_sqrt, float eps) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float pi = p[i] * decay;
    float mi = m[i] + w1 * (gi - m[i]);
    float vi = v[i] * b2 + w2 * gi * gi;
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = pi + -step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
}

// Grokfast EMA: ema = g on the first step; ema = ema * a + g * (1 - a); g = g + ema * lamb.
extern "C" __global__ void grokfast_ema(float* ema, float* g, long n, float a, float one_minus_a,
                                        float lamb, int first) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float e = first ? g[i] : ema[i];
    e = e * a + g[i] * one_minus_a;
    ema[i] = e;
    g[i] = g[i] + e * lamb;
}
"#;
