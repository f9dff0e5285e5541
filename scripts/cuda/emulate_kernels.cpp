// Runs our CUDA kernels (the fused engine's policies/src/cuda_engine/kernels.cu and the
// gradient norm's policies/src/optim_kernels.cu) on the CPU, one OS thread per CUDA thread with
// a barrier for __syncthreads, and checks every kernel against plain loops written from the
// host engine's rules (infer.rs, optim.rs): embedding, the norms with a pending residual bias,
// bias + RoPE + the KV-cache write, attention over padded cache rows, bias + GELU, SwiGLU, the
// row gather and copy, the f64 sum of squares and the scale. A preflight for GPU time, not a
// test of the GPU: it catches indexing and reduction slips before a lent machine does.
// scripts/cuda/emulate_kernels.sh builds and runs it.
//
// The kernels are #included as written; the only rewrite (done by the .sh) turns the dynamic
// `extern __shared__` array into a pointer to `dyn_smem`.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;
static std::barrier<> *block_barrier;
static float dyn_smem[4096];
#define __global__
#define __device__
#define __shared__ static  // blocks run one at a time, so a block's shared memory is a static
static void __syncthreads() { block_barrier->arrive_and_wait(); }
static float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

#include KERNELS
#include OPTIM_KERNELS

// Every block of the grid in turn, each as blockDim.x threads.
static void launch(Dim3 grid, unsigned threads, const std::function<void()> &kernel) {
    gridDim = grid;
    blockDim = Dim3{threads, 1, 1};
    for (unsigned by = 0; by < grid.y; by++)
        for (unsigned bx = 0; bx < grid.x; bx++) {
            std::barrier<> bar(threads);
            block_barrier = &bar;
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; t++)
                pool.emplace_back([&, t] {
                    threadIdx = Dim3{t, 0, 0};
                    blockIdx = Dim3{bx, by, 0};
                    kernel();
                });
            for (auto &th : pool) th.join();
        }
}

static std::mt19937 rng(7);
static std::vector<float> randn(size_t n) {
    std::normal_distribution<float> d;
    std::vector<float> v(n);
    for (auto &x : v) x = d(rng);
    return v;
}

static int failures = 0;
static void expect_close(const char *what, const std::vector<float> &got, const std::vector<float> &want, float tol) {
    float worst = 0;
    for (size_t i = 0; i < want.size(); i++) worst = std::fmax(worst, std::fabs(got[i] - want[i]));
    bool ok = got.size() == want.size() && worst <= tol;
    std::printf("%-44s max |diff| %.2e  %s\n", what, worst, ok ? "ok" : "FAILED");
    failures += !ok;
}

// row_norm, LayerNorm and RMSNorm, with and without the pending bias xb.
static void check_norm(int rms, int has_xb) {
    const int rows = 3, c = 300;  // c > BLOCK: threads take several columns each
    auto x = randn(rows * c), w = randn(c), b = randn(c), xb = randn(c);
    std::vector<float> want_x = x, want(rows * c), out(rows * c);
    for (int r = 0; r < rows; r++) {
        float *xr = &want_x[r * c];
        if (has_xb)
            for (int j = 0; j < c; j++) xr[j] += xb[j];
        double mean = 0, var = 0;
        if (!rms) {
            for (int j = 0; j < c; j++) mean += xr[j];
            mean /= c;
        }
        for (int j = 0; j < c; j++) var += (xr[j] - mean) * (xr[j] - mean);
        double inv = 1.0 / std::sqrt(var / c + 1e-5);
        for (int j = 0; j < c; j++) want[r * c + j] = float((xr[j] - mean) * inv * w[j] + (rms ? 0 : b[j]));
    }
    launch(Dim3{rows, 1, 1}, 256,
           [&] { row_norm(out.data(), x.data(), w.data(), b.data(), c, 1e-5f, rms, !rms, xb.data(), has_xb); });
    char name[64];
    std::snprintf(name, sizeof name, "row_norm %s%s: output", rms ? "rms" : "layer", has_xb ? " + xb" : "");
    expect_close(name, out, want, 2e-5f);
    std::snprintf(name, sizeof name, "row_norm %s%s: x in place", rms ? "rms" : "layer", has_xb ? " + xb" : "");
    expect_close(name, x, want_x, 0);
}

// qkv_prep then attention for tokens of several cache rows: row 0 takes a 3-token prefill after
// 2 pad columns, row 2 one decode token after 4 cached columns (1 pad), row 1 is untouched.
static void check_attention(int rope, int has_bias) {
    const int nh = 4, nkv = 2, dh = 8, cap = 8, rows = 3, width = (nh + 2 * nkv) * dh;
    Shape sh{width, nh, nkv, dh, cap, has_bias, rope, 1.0f / std::sqrt(float(dh))};
    std::vector<unsigned> row = {0, 0, 0, 2}, col = {2, 3, 4, 4}, pad = {2, 2, 2, 1}, pos(4);
    for (int i = 0; i < 4; i++) pos[i] = col[i] - pad[i];
    const int m = 4;
    auto qkv = randn(m * width), bias = randn(width), kc = randn(rows * nkv * cap * dh);
    auto vc = randn(kc.size()), scores = std::vector<float>(m * nh * cap), out = std::vector<float>(m * nh * dh);
    std::vector<float> inv_freq(dh / 2);
    for (int j = 0; j < dh / 2; j++) inv_freq[j] = 1.0f / std::pow(10000.0f, 2.0f * j / dh);
    // expected: the biased, rotated q | k | v, k and v written into the cache copies
    std::vector<float> q(m * nh * dh), ekc = kc, evc = vc;
    for (int i = 0; i < m; i++)
        for (int head = 0; head < nh + 2 * nkv; head++) {
            float v[dh];
            for (int j = 0; j < dh; j++) v[j] = qkv[i * width + head * dh + j] + (has_bias ? bias[head * dh + j] : 0);
            if (rope && head < nh + nkv)
                for (int j = 0; j < dh / 2; j++) {
                    float s = std::sin(pos[i] * inv_freq[j]), co = std::cos(pos[i] * inv_freq[j]);
                    float a = v[j], c2 = v[j + dh / 2];
                    v[j] = a * co - c2 * s;
                    v[j + dh / 2] = c2 * co + a * s;
                }
            for (int j = 0; j < dh; j++) {
                if (head < nh) q[(i * nh + head) * dh + j] = v[j];
                else {
                    int h = (head - nh) % nkv;
                    auto &cache = head < nh + nkv ? ekc : evc;
                    cache[((row[i] * nkv + h) * cap + col[i]) * dh + j] = v[j];
                }
            }
        }
    std::vector<float> want(m * nh * dh);
    for (int i = 0; i < m; i++)
        for (int h = 0; h < nh; h++) {
            int kvh = h / (nh / nkv);
            std::vector<double> p;
            double mx = -1e30, sum = 0;
            for (unsigned j = pad[i]; j <= col[i]; j++) {
                double dot = 0;
                for (int d = 0; d < dh; d++)
                    dot += q[(i * nh + h) * dh + d] * ekc[((row[i] * nkv + kvh) * cap + j) * dh + d];
                p.push_back(dot * sh.scale);
                mx = std::fmax(mx, p.back());
            }
            for (auto &e : p) sum += e = std::exp(e - mx);
            for (int d = 0; d < dh; d++) {
                double acc = 0;
                for (unsigned j = pad[i]; j <= col[i]; j++)
                    acc += p[j - pad[i]] * evc[((row[i] * nkv + kvh) * cap + j) * dh + d];
                want[(i * nh + h) * dh + d] = float(acc / sum);
            }
        }
    launch(Dim3{m, 1, 1}, 256, [&] {
        qkv_prep(qkv.data(), bias.data(), pos.data(), row.data(), col.data(), kc.data(), vc.data(), inv_freq.data(), sh);
    });
    launch(Dim3{m, nh, 1}, 128, [&] {
        attention(out.data(), qkv.data(), kc.data(), vc.data(), row.data(), col.data(), pad.data(), scores.data(), sh);
    });
    char name[64];
    std::snprintf(name, sizeof name, "qkv_prep%s%s: k cache", rope ? " rope" : "", has_bias ? " bias" : "");
    expect_close(name, kc, ekc, 1e-5f);
    std::snprintf(name, sizeof name, "qkv_prep%s%s: v cache", rope ? " rope" : "", has_bias ? " bias" : "");
    expect_close(name, vc, evc, 1e-5f);
    std::snprintf(name, sizeof name, "attention%s%s", rope ? " rope" : "", has_bias ? " bias" : "");
    expect_close(name, out, want, 1e-5f);
}

// The element-wise kernels, on grids smaller than their work (grid-stride loops).
static void check_elementwise() {
    const int m = 5, n = 70, f = 33;
    // embed: token and learned position rows
    auto wte = randn(10 * n), wpe = randn(6 * n);
    std::vector<unsigned> ids = {3, 9, 0, 3, 7}, pos = {0, 1, 5, 2, 4};
    std::vector<float> x(m * n), want(m * n);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) want[i * n + j] = wte[ids[i] * n + j] + wpe[pos[i] * n + j];
    launch(Dim3{m, 1, 1}, 64, [&] { embed(x.data(), wte.data(), wpe.data(), ids.data(), pos.data(), n, 1); });
    expect_close("embed", x, want, 0);
    // bias_act: + b, then GELU tanh (1) or erf (2)
    for (int act = 0; act < 3; act++) {
        auto y = randn(m * n), b = randn(n);
        for (int e = 0; e < m * n; e++) {
            double v = y[e] + b[e % n];
            if (act == 1) v = 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
            if (act == 2) v = 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
            want[e] = float(v);
        }
        launch(Dim3{2, 1, 1}, 32, [&] { bias_act(y.data(), b.data(), m, n, 1, act); });
        const char *names[] = {"bias_act: bias", "bias_act: bias + GELU tanh", "bias_act: bias + GELU erf"};
        expect_close(names[act], y, want, 2e-6f);
    }
    // swiglu over gate|up rows
    auto gu = randn(m * 2 * f);
    std::vector<float> a(m * f), wa(m * f);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < f; j++) {
            double g = gu[i * 2 * f + j];
            wa[i * f + j] = float(g / (1 + std::exp(-g)) * gu[i * 2 * f + f + j]);
        }
    launch(Dim3{2, 1, 1}, 32, [&] { swiglu(a.data(), gu.data(), m, f); });
    expect_close("swiglu", a, wa, 2e-6f);
    // gather_rows, copy_span
    std::vector<unsigned> rows = {4, 1};
    std::vector<float> picked(2 * n), wp(2 * n);
    for (int r = 0; r < 2; r++)
        for (int j = 0; j < n; j++) wp[r * n + j] = want[rows[r] * n + j];
    launch(Dim3{2, 1, 1}, 64, [&] { gather_rows(picked.data(), want.data(), rows.data(), n); });
    expect_close("gather_rows", picked, wp, 0);
    auto buf = randn(4 * n), wbuf = buf;
    std::copy(wbuf.begin() + 1 * n, wbuf.begin() + 2 * n, wbuf.begin() + 3 * n);
    launch(Dim3{2, 1, 1}, 32, [&] { copy_span(buf.data(), 3 * n, 1 * n, n); });
    expect_close("copy_span", buf, wbuf, 0);
}

// optim_kernels.cu: the one-block f64 sum of squares (its full THREADS) and the scale.
static void check_grad_norm() {
    const unsigned long long n = 5000;
    auto g = randn(n);
    double want = 0, got = 0;
    for (float v : g) want += double(v) * v;
    launch(Dim3{1, 1, 1}, THREADS, [&] { sum_sq_f64(g.data(), n, &got); });
    expect_close("sum_sq_f64", {float(got / want)}, {1.0f}, 1e-7f);
    std::vector<float> wg(n);
    for (size_t i = 0; i < n; i++) wg[i] = g[i] * 0.5f;
    launch(Dim3{3, 1, 1}, 128, [&] { scale_f32(g.data(), n, 0.5f); });
    expect_close("scale_f32", g, wg, 0);
}

int main() {
    check_elementwise();
    for (int rms = 0; rms < 2; rms++)
        for (int has_xb = 0; has_xb < 2; has_xb++) check_norm(rms, has_xb);
    check_attention(0, 1);  // GPT-2: bias, no RoPE
    check_attention(1, 0);  // Llama: RoPE, no bias
    check_grad_norm();
    std::printf(failures ? "%d FAILED\n" : "all kernels match\n", failures);
    return failures != 0;
}
