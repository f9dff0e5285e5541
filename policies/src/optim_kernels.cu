// Gradient-norm kernels for dfdx's CUDA gradient buffers (optim.rs; compiled at run time with
// NVRTC, no headers).

#define THREADS 1024

// out[0] = Σ g[i]² in f64: one block of THREADS threads, each a fixed stride of the buffer,
// then a fixed tree: the same sum, bit for bit, on every run.
extern "C" __global__ void sum_sq_f64(const float *g, unsigned long long n, double *out) {
    __shared__ double buf[THREADS];
    double s = 0.0;
    for (unsigned long long i = threadIdx.x; i < n; i += THREADS) {
        double v = (double)g[i];
        s += v * v;
    }
    buf[threadIdx.x] = s;
    __syncthreads();
    for (int k = THREADS / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) buf[threadIdx.x] += buf[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = buf[0];
}

// g[i] *= s.
extern "C" __global__ void scale_f32(float *g, unsigned long long n, float s) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        g[i] *= s;
}
