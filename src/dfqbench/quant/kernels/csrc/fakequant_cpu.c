/* dfqbench's CPU fake-quant kernel: one pass over x, y = clamp(rint(x * inv), lo, hi) * scale, plus (optional)
 * the straight-through mask (1 where rint(x * inv) lies within [lo, hi]). rint rounds half to even in the default
 * rounding mode, as ATen's nearbyint. Plain C with OpenMP, no torch headers: built in about a second by
 * kernels/cpu_ext.py on first use and called through ctypes on the tensors' data pointers.
 * Per channel: x viewed as [outer, C, inner] (contiguous; channels_last activations are [N*H*W, C, 1]). */
#include <math.h>
#include <stdint.h>

#define GRAIN 32768

static inline float fq(float v, float inv, float scale, float lo, float hi) {
    float r = rintf(v * inv);
    r = r < lo ? lo : r;
    r = r > hi ? hi : r;
    return r * scale;
}

void fq_per_tensor(const float *x, float *y, uint8_t *mask, int64_t n, float inv, float scale, float lo,
                   float hi, int threads) {
    int nt = n < GRAIN ? 1 : threads;
    if (mask) {
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t i = 0; i < n; i++) {
            float r = rintf(x[i] * inv);
            mask[i] = (r >= lo) & (r <= hi);
            r = r < lo ? lo : r;
            r = r > hi ? hi : r;
            y[i] = r * scale;
        }
    } else {
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t i = 0; i < n; i++) y[i] = fq(x[i], inv, scale, lo, hi);
    }
}

void fq_per_channel(const float *x, float *y, uint8_t *mask, int64_t outer, int64_t channels, int64_t inner,
                    const float *inv, const float *scale, const float *lo, const float *hi, int threads) {
    int64_t n = outer * channels * inner;
    int nt = n < GRAIN ? 1 : threads;
    if (inner == 1) {  /* channels innermost (channels_last activations, [C] rows) */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t o = 0; o < outer; o++) {
            const float *xo = x + o * channels;
            float *yo = y + o * channels;
            for (int64_t c = 0; c < channels; c++) {
                float r = rintf(xo[c] * inv[c]);
                if (mask) mask[o * channels + c] = (r >= lo[c]) & (r <= hi[c]);
                r = r < lo[c] ? lo[c] : r;
                r = r > hi[c] ? hi[c] : r;
                yo[c] = r * scale[c];
            }
        }
        return;
    }
    #pragma omp parallel for collapse(2) num_threads(nt) schedule(static)
    for (int64_t o = 0; o < outer; o++) {
        for (int64_t c = 0; c < channels; c++) {
            int64_t base = (o * channels + c) * inner;
            float iv = inv[c], s = scale[c], l = lo[c], h = hi[c];
            if (mask) {
                for (int64_t i = 0; i < inner; i++) {
                    float r = rintf(x[base + i] * iv);
                    mask[base + i] = (r >= l) & (r <= h);
                    r = r < l ? l : r;
                    r = r > h ? h : r;
                    y[base + i] = r * s;
                }
            } else {
                for (int64_t i = 0; i < inner; i++) y[base + i] = fq(x[base + i], iv, s, l, h);
            }
        }
    }
}
