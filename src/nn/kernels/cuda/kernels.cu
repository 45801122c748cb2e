// vigil's CUDA kernels (issue 20): the depthwise convolution and the bias/activation/residual
// epilogue of a 1x1 convolution, on candle's channels-first (NCHW) f32 tensors. Compiled at run
// time with NVRTC (src/nn/kernels/cuda/mod.rs), so the default build needs no CUDA toolkit.

// Output tile of one thread block of the depthwise kernels: one thread per output pixel.
#define TILE_W 32
#define TILE_H 8

// One (image, channel) plane per blockIdx.z, a TILE_H x TILE_W output tile per block: the input
// window of the tile (zero outside the image) goes through shared memory once, the K*K weights
// into registers; bias and clamp fused.
template <int K, int S>
__device__ void depthwise_tile(const float* __restrict__ x, const float* __restrict__ w,
                               const float* __restrict__ bias, float* __restrict__ y,
                               int channels, int height, int width, int out_h, int out_w,
                               int pad_top, int pad_left, float lo, float hi) {
    constexpr int IW = (TILE_W - 1) * S + K;
    constexpr int IH = (TILE_H - 1) * S + K;
    __shared__ float tile[IH][IW + 1];
    const int plane = blockIdx.z;
    const int c = plane % channels;
    const float* xp = x + (size_t)plane * height * width;
    const int ox0 = blockIdx.x * TILE_W, oy0 = blockIdx.y * TILE_H;
    const int ix0 = ox0 * S - pad_left, iy0 = oy0 * S - pad_top;
    for (int i = threadIdx.y * TILE_W + threadIdx.x; i < IH * IW; i += TILE_W * TILE_H) {
        const int ty = i / IW, tx = i % IW;
        const int iy = iy0 + ty, ix = ix0 + tx;
        tile[ty][tx] = (iy >= 0 && iy < height && ix >= 0 && ix < width) ? xp[iy * width + ix] : 0.f;
    }
    float taps[K * K];
#pragma unroll
    for (int t = 0; t < K * K; ++t) taps[t] = w[c * K * K + t];
    __syncthreads();
    const int ox = ox0 + threadIdx.x, oy = oy0 + threadIdx.y;
    if (ox >= out_w || oy >= out_h) return;
    float acc = bias[c];
#pragma unroll
    for (int ky = 0; ky < K; ++ky)
#pragma unroll
        for (int kx = 0; kx < K; ++kx)
            acc = fmaf(tile[threadIdx.y * S + ky][threadIdx.x * S + kx], taps[ky * K + kx], acc);
    y[(size_t)plane * out_h * out_w + oy * out_w + ox] = fminf(fmaxf(acc, lo), hi);
}

#define DEPTHWISE(K, S)                                                                          \
    extern "C" __global__ void depthwise_k##K##_s##S(                                            \
        const float* x, const float* w, const float* bias, float* y, int channels, int height,   \
        int width, int out_h, int out_w, int pad_top, int pad_left, float lo, float hi) {        \
        depthwise_tile<K, S>(x, w, bias, y, channels, height, width, out_h, out_w, pad_top,      \
                             pad_left, lo, hi);                                                  \
    }
DEPTHWISE(3, 1)
DEPTHWISE(3, 2)
DEPTHWISE(5, 1)
DEPTHWISE(5, 2)

// Any other kernel size and stride: one thread per output value, the taps read from global memory.
extern "C" __global__ void depthwise_any(const float* __restrict__ x, const float* __restrict__ w,
                                         const float* __restrict__ bias, float* __restrict__ y,
                                         int channels, int height, int width, int out_h, int out_w,
                                         int kernel, int stride, int pad_top, int pad_left,
                                         long long total, float lo, float hi) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int ox = i % out_w;
        const int oy = (i / out_w) % out_h;
        const long long plane = i / ((long long)out_w * out_h);
        const int c = plane % channels;
        const float* xp = x + plane * height * width;
        const float* wp = w + (size_t)c * kernel * kernel;
        float acc = bias[c];
        for (int ky = 0; ky < kernel; ++ky) {
            const int iy = oy * stride + ky - pad_top;
            if (iy < 0 || iy >= height) continue;
            for (int kx = 0; kx < kernel; ++kx) {
                const int ix = ox * stride + kx - pad_left;
                if (ix >= 0 && ix < width) acc = fmaf(xp[iy * width + ix], wp[ky * kernel + kx], acc);
            }
        }
        y[i] = fminf(fmaxf(acc, lo), hi);
    }
}

// y = clamp(x + bias[channel], lo, hi) (+ residual): the epilogue of a 1x1 convolution done as a
// matrix product, one kernel instead of a broadcast add, a clamp and an add.
template <bool RESIDUAL>
__device__ void bias_act_values(const float* __restrict__ x, const float* __restrict__ bias,
                                const float* __restrict__ residual, float* __restrict__ y,
                                int channels, long long plane, long long total, float lo, float hi) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        float v = fminf(fmaxf(x[i] + bias[(i / plane) % channels], lo), hi);
        if (RESIDUAL) v += residual[i];
        y[i] = v;
    }
}

extern "C" __global__ void bias_act(const float* x, const float* bias, float* y, int channels,
                                    long long plane, long long total, float lo, float hi) {
    bias_act_values<false>(x, bias, nullptr, y, channels, plane, total, lo, hi);
}

extern "C" __global__ void bias_act_residual(const float* x, const float* bias,
                                             const float* residual, float* y, int channels,
                                             long long plane, long long total, float lo, float hi) {
    bias_act_values<true>(x, bias, residual, y, channels, plane, total, lo, hi);
}
