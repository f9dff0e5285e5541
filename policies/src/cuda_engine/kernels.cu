// The fused CUDA decode engine's kernels (compiled at run time with NVRTC; see mod.rs). Each
// mirrors a step of the host engine (infer.rs) on row-major f32 buffers; the matmuls go to
// cuBLAS. No headers: only NVRTC's built-in math functions.

#define BLOCK 256

// Shapes of qkv_prep and attention (mod.rs's `Shape`).
struct Shape {
    int width, nh, nkv, dh, cap, has_bias, rope;
    float scale;
};

// Sum (or max) over the block; every thread gets the result. `buf` holds BLOCK floats.
__device__ float block_sum(float v, float *buf) {
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    float r = buf[0];
    __syncthreads();
    return r;
}

__device__ float block_max(float v, float *buf) {
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] = fmaxf(buf[threadIdx.x], buf[threadIdx.x + s]);
        __syncthreads();
    }
    float r = buf[0];
    __syncthreads();
    return r;
}

// x[i, :] = wte[ids[i], :] (+ wpe[pos[i], :]); one block per token.
extern "C" __global__ void embed(float *x, const float *wte, const float *wpe, const unsigned int *ids,
                                 const unsigned int *pos, int c, int has_wpe) {
    int i = blockIdx.x;
    const float *e = wte + (size_t)ids[i] * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float v = e[j];
        if (has_wpe) v += wpe[(size_t)pos[i] * c + j];
        x[(size_t)i * c + j] = v;
    }
}

// out[i, :] = norm(x[i, :]) · w (+ b): LayerNorm (biased variance) or, with rms, RMSNorm. One
// block per row. With has_xb, x[i, :] += xb first, in place: the residual stream's pending
// bias (an attention or MLP output projection's) is added here rather than by its own launch.
extern "C" __global__ void row_norm(float *out, float *x, const float *w, const float *b, int c, float eps,
                                int rms, int has_b, const float *xb, int has_xb) {
    __shared__ float buf[BLOCK];
    float *xr = x + (size_t)blockIdx.x * c;
    float *o = out + (size_t)blockIdx.x * c;
    // each thread reads back only the columns it wrote, so no barrier is needed
    if (has_xb)
        for (int j = threadIdx.x; j < c; j += blockDim.x) xr[j] += xb[j];
    float mean = 0.0f;
    if (!rms) {
        float s = 0.0f;
        for (int j = threadIdx.x; j < c; j += blockDim.x) s += xr[j];
        mean = block_sum(s, buf) / c;
    }
    float sq = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float d = xr[j] - mean;
        sq += d * d;
    }
    float inv = 1.0f / sqrtf(block_sum(sq, buf) / c + eps);
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float v = (xr[j] - mean) * inv * w[j];
        o[j] = has_b ? v + b[j] : v;
    }
}

// The element offset in a layer's KV cache `(rows, nkv, cap, dh)` of (row, kv head 0, column).
__device__ size_t cache_slot(unsigned int row, unsigned int col, const Shape &sh) {
    return ((size_t)row * sh.nkv * sh.cap + col) * sh.dh;
}

// One block per token of the fused q|k|v row (width = qd + 2·kvd): adds the bias, rotates q
// and k by RoPE at the token's position (rope: inv_freq has dh/2 entries), writes k and v into
// the layer's cache at the token's cache row and column (kv heads are `cap·dh` apart) and
// leaves q in place for the attention kernel.
extern "C" __global__ void qkv_prep(float *qkv, const float *bias, const unsigned int *pos,
                                    const unsigned int *row, const unsigned int *col, float *kc, float *vc,
                                    const float *inv_freq, Shape sh) {
    int width = sh.width, nh = sh.nh, nkv = sh.nkv, dh = sh.dh, cap = sh.cap, has_bias = sh.has_bias;
    int rope = sh.rope;
    int i = blockIdx.x;
    size_t slot = cache_slot(row[i], col[i], sh);
    float *r = qkv + (size_t)i * width;
    int half = dh / 2, qd = nh * dh, kvd = nkv * dh;
    // q and k heads, pairs (j, j + half)
    for (int idx = threadIdx.x; idx < (nh + nkv) * half; idx += blockDim.x) {
        int head = idx / half, j = idx % half;
        int base = head * dh;  // k heads follow the q heads in the fused row
        float a = r[base + j], c2 = r[base + j + half];
        if (has_bias) {
            a += bias[base + j];
            c2 += bias[base + j + half];
        }
        if (rope) {
            float s, co;
            sincosf((float)pos[i] * inv_freq[j], &s, &co);
            float na = a * co - c2 * s, nc = c2 * co + a * s;
            a = na;
            c2 = nc;
        }
        if (head < nh) {
            r[base + j] = a;
            r[base + j + half] = c2;
        } else {
            int h = head - nh;
            float *k = kc + slot + (size_t)h * cap * dh;
            k[j] = a;
            k[j + half] = c2;
        }
    }
    for (int e = threadIdx.x; e < kvd; e += blockDim.x) {
        int h = e / dh, j = e % dh;
        float v = r[qd + kvd + e];
        if (has_bias) v += bias[qd + kvd + e];
        vc[slot + (size_t)h * cap * dh + j] = v;
    }
}

// Softmax attention of one token's query head (block (i, h)) over its row's cached keys in
// columns [pad[i], col[i]] (the token's own column included; row[i] its cache row):
// out[i, h·dh..] =
// Σ_j softmax(q·k_j·scale)_j v_j. Query head h reads KV head h / (nh / nkv). `scores` is
// global scratch of cap floats per (token, head). A pad query (col < pad) writes zeros.
extern "C" __global__ void attention(float *out, const float *qkv, const float *kc, const float *vc,
                                     const unsigned int *row, const unsigned int *col,
                                     const unsigned int *pad, float *scores, Shape sh) {
    int width = sh.width, nh = sh.nh, nkv = sh.nkv, dh = sh.dh, cap = sh.cap;
    float scale = sh.scale;
    __shared__ float buf[BLOCK];
    extern __shared__ float q[];  // dh floats
    int i = blockIdx.x, h = blockIdx.y;
    int kvh = h / (nh / nkv);
    float *o = out + (size_t)i * nh * dh + (size_t)h * dh;
    int lo = pad[i], hi = col[i];
    if (hi < lo) {
        for (int d = threadIdx.x; d < dh; d += blockDim.x) o[d] = 0.0f;
        return;
    }
    for (int d = threadIdx.x; d < dh; d += blockDim.x) q[d] = qkv[(size_t)i * width + h * dh + d];
    __syncthreads();
    size_t row0 = cache_slot(row[i], 0, sh);  // the row's (kv head 0, column 0)
    const float *k = kc + row0 + (size_t)kvh * cap * dh;
    const float *v = vc + row0 + (size_t)kvh * cap * dh;
    float *s = scores + ((size_t)i * nh + h) * cap;
    float m = -__int_as_float(0x7f800000);  // -inf (NVRTC has no INFINITY without headers)
    for (int j = lo + threadIdx.x; j <= hi; j += blockDim.x) {
        const float *kj = k + (size_t)j * dh;
        float dot = 0.0f;
        for (int d = 0; d < dh; d++) dot += q[d] * kj[d];
        dot *= scale;
        s[j] = dot;
        m = fmaxf(m, dot);
    }
    m = block_max(m, buf);
    float sum = 0.0f;
    for (int j = lo + threadIdx.x; j <= hi; j += blockDim.x) {
        float e = expf(s[j] - m);
        s[j] = e;
        sum += e;
    }
    float inv = 1.0f / block_sum(sum, buf);  // also orders the writes to s before the reads below
    for (int d = threadIdx.x; d < dh; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = lo; j <= hi; j++) acc += s[j] * v[(size_t)j * dh + d];
        o[d] = acc * inv;
    }
}

// x[i, j] += b[j] over (m, n), then act: 0 none, 1 GELU tanh (gelu_new), 2 GELU erf.
extern "C" __global__ void bias_act(float *x, const float *b, int m, int n, int has_b, int act) {
    size_t total = (size_t)m * n;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        float v = x[e];
        if (has_b) v += b[e % n];
        if (act == 1) {
            v = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
        } else if (act == 2) {
            v = 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
        }
        x[e] = v;
    }
}

// out[i, j] = silu(gu[i, j]) · gu[i, f + j]: SwiGLU over the fused gate|up rows (m, 2f).
extern "C" __global__ void swiglu(float *out, const float *gu, int m, int f) {
    size_t total = (size_t)m * f;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        size_t i = e / f, j = e % f;
        float g = gu[i * 2 * f + j];
        out[e] = g / (1.0f + expf(-g)) * gu[i * 2 * f + f + j];
    }
}

// out[r, :] = x[rows[r], :] for the picked rows; one block per picked row.
extern "C" __global__ void gather_rows(float *out, const float *x, const unsigned int *rows, int c) {
    const float *src = x + (size_t)rows[blockIdx.x] * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) out[(size_t)blockIdx.x * c + j] = src[j];
}

// buf[dst_off + e] = buf[src_off + e] for e < n: a KV-cache row copied to another row of the
// same buffer (the spans are disjoint).
extern "C" __global__ void copy_span(float *buf, unsigned long long dst_off, unsigned long long src_off,
                                     unsigned long long n) {
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x)
        buf[dst_off + e] = buf[src_off + e];
}
