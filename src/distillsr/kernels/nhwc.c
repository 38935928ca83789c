/* Fused CPU kernels for ASID inference on NHWC float32 maps (see kernels/__init__.py).
 *
 * A map is B x H x W pixels of C channels; pixel (b, i, j) starts at
 * x + ((b*H + i)*W + j)*xs (xs >= C: a map can be a channel slice of a wider one).
 * Outputs are contiguous rows of C floats. "layout" says which row pixel (b, i, j)
 * goes to when a kernel writes tokens (the order of distillsr.models.asid.to_tokens),
 * with h = H/8, w = W/8:
 *   0 image   (b*H + i)*W + j
 *   1 meso    8x8 window (i/8, j/8), member (i%8, j%8)
 *   2 global  grid group (i%h, j%w), member (i/h, j/w)
 *   3 grid    group (i%8, j%8), member (i/8, j/8), h*w members
 * In all four the row is a sum of a part from (b, i) and a part from j.
 * Loops run over image rows in parallel (OpenMP, `threads`); the work on one row is
 * compiled separately for the usual channel counts so that it is fully vectorised.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define MAX_C 256 /* dwconv3x3: channels at most (the caller checks) */
#ifndef PF_AHEAD
#define PF_AHEAD 8 /* software prefetch distance, pixels (0: none) */
#endif

static long row_part(int layout, int b, int i, int H, int W) {
    long h = H / 8, w = W / 8;
    switch (layout) {
    case 1: return ((long)b * h * w + (i / 8) * w) * 64 + (i % 8) * 8;
    case 2: return ((long)b * h * w + (i % h) * w) * 64 + (i / h) * 8;
    case 3: return ((long)b * 64 + (i % 8) * 8) * h * w + (i / 8) * w;
    default: return ((long)b * H + i) * W;
    }
}

static long col_part(int layout, int j, int H, int W) {
    long h = H / 8, w = W / 8;
    switch (layout) {
    case 1: return (j / 8) * 64 + j % 8;
    case 2: return (j % w) * 64 + j / w;
    case 3: return (j % 8) * h * w + j / 8;
    default: return j;
    }
}

/* Calls ROW(c) with a compile-time channel count where it is a usual one. */
#define BY_CHANNELS(C, ROW)                     \
    switch (C) {                                \
    case 12: ROW(12); break;                    \
    case 16: ROW(16); break;                    \
    case 24: ROW(24); break;                    \
    case 32: ROW(32); break;                    \
    case 36: ROW(36); break;                    \
    case 48: ROW(48); break;                    \
    case 64: ROW(64); break;                    \
    default: ROW(C); break;                     \
    }

/* Calls REG(nv, tail) for the channel counts dw_row_reg keeps in registers (C = 8 nv + 4
 * tail: 12, 16, 24, 32, 36, 48); `other` runs for any other C. */
#define BY_REG_WIDTH(C, REG, other)             \
    switch (C) {                                \
    case 12: REG(1, 1); break;                  \
    case 16: REG(2, 0); break;                  \
    case 24: REG(3, 0); break;                  \
    case 32: REG(4, 0); break;                  \
    case 36: REG(4, 1); break;                  \
    case 48: REG(6, 0); break;                  \
    default: other;                             \
    }

/* ------------------------------------------------------------------ LayerNorm */
typedef float v4f __attribute__((vector_size(16)));

/* sum of c[0 .. C), C a multiple of 4, in two 4-lane partial sums */
ALWAYS_INLINE float sum4(const float *c, const int C) {
    v4f a = {0}, b = {0}, v;
    int k = 0;
    for (; k + 8 <= C; k += 8) {
        memcpy(&v, c + k, sizeof v); a += v;
        memcpy(&v, c + k + 4, sizeof v); b += v;
    }
    if (k < C) { memcpy(&v, c + k, sizeof v); a += v; }
    a += b;
    return (a[0] + a[2]) + (a[1] + a[3]);
}

ALWAYS_INLINE void norm_pixel(const float *x, float *out, const int C, const float *g,
                              const float *be, float eps) {
    float mean, rstd;
    if (C % 4 == 0 && C <= MAX_C) {
        float d[MAX_C];
        mean = sum4(x, C) / C;
        for (int c = 0; c < C; c++) { float t = x[c] - mean; d[c] = t * t; }
        rstd = 1.f / sqrtf(sum4(d, C) / C + eps);
    } else {
        float s = 0.f, v = 0.f;
        for (int c = 0; c < C; c++) s += x[c];
        mean = s / C;
        for (int c = 0; c < C; c++) { float t = x[c] - mean; v += t * t; }
        rstd = 1.f / sqrtf(v / C + eps);
    }
    for (int c = 0; c < C; c++) out[c] = (x[c] - mean) * rstd * g[c] + be[c];
}

ALWAYS_INLINE void norm_row(const float *x, long xs, float *y, const long *cols, int W,
                            const int C, const float *g, const float *be, float eps) {
    for (int j = 0; j < W; j++) norm_pixel(x + j * xs, y + cols[j] * C, C, g, be, eps);
}

/* y[row(b, i, j)] = LayerNorm(x[b, i, j]) */
void layer_norm(const float *x, long xs, float *y, int B, int H, int W, int C,
                const float *g, const float *be, float eps, int layout, int threads) {
    long cols[W];
    for (int j = 0; j < W; j++) cols[j] = col_part(layout, j, H, W);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long bi = 0; bi < (long)B * H; bi++) {
        float *yr = y + row_part(layout, bi / H, bi % H, H, W) * C;
        const float *xr = x + bi * W * xs;
#define ROW(c) norm_row(xr, xs, yr, cols, W, c, g, be, eps)
        BY_CHANNELS(C, ROW)
#undef ROW
    }
}

/* y[b, i, j] = x[b, i, j] + t[row(b, i, j)];  z = LayerNorm(y) (z NULL: the sum only) */
ALWAYS_INLINE void add_norm_row(const float *x, long xs, const float *t, float *y, float *z,
                                const long *cols, int W, const int C, const float *g,
                                const float *be, float eps) {
    for (int j = 0; j < W; j++) {
        const float *xp = x + j * xs, *tp = t + cols[j] * C;
        float *yp = y + (long)j * C;
        for (int c = 0; c < C; c++) yp[c] = xp[c] + tp[c];
        if (z) norm_pixel(yp, z + (long)j * C, C, g, be, eps);
    }
}

void add_tokens_norm(const float *x, long xs, const float *t, float *y, float *z,
                     int B, int H, int W, int C, const float *g, const float *be, float eps,
                     int layout, int threads) {
    long cols[W];
    for (int j = 0; j < W; j++) cols[j] = col_part(layout, j, H, W);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long bi = 0; bi < (long)B * H; bi++) {
        const float *tr = t + row_part(layout, bi / H, bi % H, H, W) * C;
        const float *xr = x + bi * W * xs;
        float *yr = y + bi * W * C, *zr = z ? z + bi * W * C : NULL;
#define ROW(c) add_norm_row(xr, xs, tr, yr, zr, cols, W, c, g, be, eps)
        BY_CHANNELS(C, ROW)
#undef ROW
    }
}

/* ------------------------------------------------------------------ GELU */
/* On 8 floats at a time with GCC vector types (a cast between them keeps the bits). */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

ALWAYS_INLINE v8f load8_(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }

ALWAYS_INLINE v8f select8(v8i mask, v8f a, v8f b) { return (v8f)(((v8i)a & mask) | ((v8i)b & ~mask)); }

/* e^x and GELU for vectors of 8 (and of 16: with AVX-512 one instruction handles 16 lanes,
 * half the instructions per value; elsewhere the compiler splits them). V is the float
 * vector type, VI the int vector of the same lanes. */
#define DEFINE_EXP_GELU(V, VI, SUF)                                                           \
/* e^x, x clamped to [-87, 88]: 2^n e^r with |r| <= ln2/2, degree-7 polynomial (about 1 ulp) */ \
ALWAYS_INLINE V exp##SUF(V x) {                                                               \
    const V lo = x - x - 87.0f, hi = x - x + 88.0f, shifter = x - x + 12582912.0f;          \
    x = (V)(((VI)lo & (VI)(x < lo)) | ((VI)x & ~(VI)(x < lo)));                             \
    x = (V)(((VI)hi & (VI)(x > hi)) | ((VI)x & ~(VI)(x > hi)));                             \
    V t = x * 1.44269504088896341f + shifter; /* rounds x / ln2 to the integer n */          \
    V n = t - shifter;                                                                        \
    V r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;                        \
    V p = r * 1.98412698e-4f + 1.38888889e-3f;                                                \
    p = p * r + 8.33333333e-3f;                                                               \
    p = p * r + 4.16666667e-2f;                                                               \
    p = p * r + 1.66666667e-1f;                                                               \
    p = p * r + 0.5f;                                                                         \
    p = p * r + 1.0f;                                                                         \
    p = p * r + 1.0f;                                                                         \
    VI n_int = (VI)t - (VI)shifter;                                                           \
    return p * (V)((n_int + 127) << 23);                                                      \
}                                                                                             \
/* x/2 (1 + erf(x / sqrt 2)), erf as Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), the      \
 * approximation of ATen's vectorised CPU GELU */                                             \
ALWAYS_INLINE V gelu##SUF(V x) {                                                              \
    const VI sign = (VI)(x - x) + (int32_t)0x80000000;                                        \
    V z = (V)((VI)x & ~sign) * 0.70710678118654752f;                                          \
    V t = 1.0f / (z * 0.3275911f + 1.0f);                                                     \
    V poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f)))); \
    V e = 1.0f - poly * exp##SUF(-z * z);                                                     \
    e = (V)((VI)e ^ ((VI)x & sign)); /* erf is odd */                                         \
    return 0.5f * x * (1.0f + e);                                                             \
}

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
DEFINE_EXP_GELU(v8f, v8i, 8)
DEFINE_EXP_GELU(v16f, v16i, 16)

/* GELU of two vectors of 8 as one of 16 */
ALWAYS_INLINE void gelu8x2(v8f *a, v8f *b) {
    v16f w = __builtin_shufflevector(*a, *b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    w = gelu16(w);
    *a = __builtin_shufflevector(w, w, 0, 1, 2, 3, 4, 5, 6, 7);
    *b = __builtin_shufflevector(w, w, 8, 9, 10, 11, 12, 13, 14, 15);
}


/* ------------------------------------------------------------------ depthwise 3x3 */
/* GELU of a[0 .. n) in place; a has room for n rounded up to 8 */
ALWAYS_INLINE void gelu_inplace(float *a, const int n) {
    for (int c = 0; c < n; c += 8) {
        v8f v = gelu8(load8_(a + c));
        memcpy(a + c, &v, sizeof v);
    }
}

/* acc += the 3 taps of kernel row `wr` (3 x C, tap-major) over input row `x` at column j */
ALWAYS_INLINE void taps_of_row(float *acc, const float *x, long xs, const float *wr, int j, int W,
                               const int C) {
    const float *xc = x + j * xs;
    if (j > 0)
        for (int c = 0; c < C; c++) acc[c] += wr[c] * xc[c - xs];
    for (int c = 0; c < C; c++) acc[c] += wr[C + c] * xc[c];
    if (j < W - 1)
        for (int c = 0; c < C; c++) acc[c] += wr[2 * C + c] * xc[c + xs];
}

/* one output row: act(dw(x) + bias) [* dw2(x2)], written at y + cols[j] * C */
ALWAYS_INLINE void dw_row(const float *x, const float *x2, long xs, long rs, int top, int bottom,
                          const float *wt, const float *wt2, const float *bias, float *y,
                          const long *cols, int W, int act, const int C) {
    float acc[MAX_C + 8] __attribute__((aligned(32))) = {0}, acc2[MAX_C];
    for (int j = 0; j < W; j++) {
        for (int c = 0; c < C; c++) acc[c] = bias ? bias[c] : 0.f;
        if (top) taps_of_row(acc, x - rs, xs, wt, j, W, C);
        taps_of_row(acc, x, xs, wt + 3 * C, j, W, C);
        if (bottom) taps_of_row(acc, x + rs, xs, wt + 6 * C, j, W, C);
        if (act) gelu_inplace(acc, C);
        float *out = y + cols[j] * C;
        if (x2) {
            for (int c = 0; c < C; c++) acc2[c] = 0.f;
            if (top) taps_of_row(acc2, x2 - rs, xs, wt2, j, W, C);
            taps_of_row(acc2, x2, xs, wt2 + 3 * C, j, W, C);
            if (bottom) taps_of_row(acc2, x2 + rs, xs, wt2 + 6 * C, j, W, C);
            for (int c = 0; c < C; c++) out[c] = acc[c] * acc2[c];
        } else {
            for (int c = 0; c < C; c++) out[c] = acc[c];
        }
    }
}

/* The same with the accumulators in registers, for C = 8 NV + 4 TAIL channels (NV <= 6). */
typedef float v4f_ __attribute__((vector_size(16)));
ALWAYS_INLINE v4f_ load4_(const float *p) { v4f_ v; memcpy(&v, p, sizeof v); return v; }
ALWAYS_INLINE v4f_ gelu4(v4f_ x) {
    v8f w = {x[0], x[1], x[2], x[3], 0, 0, 0, 0};
    w = gelu8(w);
    return (v4f_){w[0], w[1], w[2], w[3]};
}

#define DW_VARS(A) v8f A##0 = {0}, A##1 = {0}, A##2 = {0}, A##3 = {0}, A##4 = {0}, A##5 = {0}; v4f_ A##t = {0}
#define DW_EACH(A, OP)                  \
    do {                                \
        OP(A##0, 0);                    \
        if (NV > 1) OP(A##1, 1);        \
        if (NV > 2) OP(A##2, 2);        \
        if (NV > 3) OP(A##3, 3);        \
        if (NV > 4) OP(A##4, 4);        \
        if (NV > 5) OP(A##5, 5);        \
    } while (0)
/* A += taps (weights w, C per tap) at input pixel pointer xp */
#define DW_TAP(A, xp, w)                                                  \
    do {                                                                  \
        const float *xp_ = (xp), *w_ = (w);                               \
        A##0 += load8_(w_) * load8_(xp_);                                 \
        if (NV > 1) A##1 += load8_(w_ + 8) * load8_(xp_ + 8);             \
        if (NV > 2) A##2 += load8_(w_ + 16) * load8_(xp_ + 16);           \
        if (NV > 3) A##3 += load8_(w_ + 24) * load8_(xp_ + 24);           \
        if (NV > 4) A##4 += load8_(w_ + 32) * load8_(xp_ + 32);           \
        if (NV > 5) A##5 += load8_(w_ + 40) * load8_(xp_ + 40);           \
        if (TAIL) A##t += load4_(w_ + 8 * NV) * load4_(xp_ + 8 * NV);      \
    } while (0)
/* A = the 3x3 conv at column j of the rows around x (the rows above and below at offsets up
 * and dn from it: -rs and rs in a map, anything in a ring of rows; pixel stride xs) */
#define DW_CONV(A, x, wt)                                                                 \
    do {                                                                                  \
        for (int di = -1; di <= 1; di++) {                                                \
            if ((di < 0 && !top) || (di > 0 && !bottom)) continue;                        \
            const float *xr_ = (x) + (di < 0 ? up : di > 0 ? dn : 0) + (long)j * xs;      \
            const float *wr_ = (wt) + (di + 1) * 3 * C;                                   \
            if (j > 0) DW_TAP(A, xr_ - xs, wr_);                                          \
            DW_TAP(A, xr_, wr_ + C);                                                      \
            if (j < W - 1) DW_TAP(A, xr_ + xs, wr_ + 2 * C);                              \
        }                                                                                 \
    } while (0)

/* Two neighbouring interior pixels (j, j + 1; 0 < j, j + 2 < W) at once: each weight
 * vector is loaded once for both, each input vector once per row (4 columns for 2 outputs
 * instead of 3 for 1). A (pixel j) and B (pixel j + 1) sum their taps in the order of
 * DW_CONV. */
#define DW_TAP2(A, B, xp, w)                                                          \
    do {                                                                              \
        const float *xp_ = (xp), *w_ = (w);                                           \
        for (int t_ = 0; t_ < 3; t_++) {                                              \
            const float *xt_ = xp_ + t_ * xs, *wt_ = w_ + t_ * C;                     \
            const float *xu_ = xt_ + xs;                                              \
            v8f w8_;                                                                  \
            w8_ = load8_(wt_); A##0 += w8_ * load8_(xt_); B##0 += w8_ * load8_(xu_);  \
            if (NV > 1) { w8_ = load8_(wt_ + 8); A##1 += w8_ * load8_(xt_ + 8); B##1 += w8_ * load8_(xu_ + 8); } \
            if (NV > 2) { w8_ = load8_(wt_ + 16); A##2 += w8_ * load8_(xt_ + 16); B##2 += w8_ * load8_(xu_ + 16); } \
            if (NV > 3) { w8_ = load8_(wt_ + 24); A##3 += w8_ * load8_(xt_ + 24); B##3 += w8_ * load8_(xu_ + 24); } \
            if (NV > 4) { w8_ = load8_(wt_ + 32); A##4 += w8_ * load8_(xt_ + 32); B##4 += w8_ * load8_(xu_ + 32); } \
            if (NV > 5) { w8_ = load8_(wt_ + 40); A##5 += w8_ * load8_(xt_ + 40); B##5 += w8_ * load8_(xu_ + 40); } \
            if (TAIL) { v4f_ w4_ = load4_(wt_ + 8 * NV);                              \
                A##t += w4_ * load4_(xt_ + 8 * NV); B##t += w4_ * load4_(xu_ + 8 * NV); } \
        }                                                                             \
    } while (0)
#define DW_CONV2(A, B, x, wt)                                                             \
    do {                                                                                  \
        for (int di = -1; di <= 1; di++) {                                                \
            if ((di < 0 && !top) || (di > 0 && !bottom)) continue;                        \
            DW_TAP2(A, B, (x) + (di < 0 ? up : di > 0 ? dn : 0) + (long)(j - 1) * xs,     \
                    (wt) + (di + 1) * 3 * C);                                             \
        }                                                                                 \
    } while (0)

ALWAYS_INLINE void dw_gelu_regs(v8f *a0, v8f *a1, v8f *a2, v8f *a3, v8f *a4, v8f *a5, v4f_ *at,
                                const int NV, const int TAIL) {
    if (NV == 1) *a0 = gelu8(*a0);
    if (NV >= 2) gelu8x2(a0, a1);
    if (NV == 3) *a2 = gelu8(*a2);
    if (NV >= 4) gelu8x2(a2, a3);
    if (NV == 5) *a4 = gelu8(*a4);
    if (NV >= 6) gelu8x2(a4, a5);
    if (TAIL) *at = gelu4(*at);
}

ALWAYS_INLINE void dw_row_reg(const float *x, const float *x2, long xs, long up, long dn, int top, int bottom,
                              const float *wt, const float *wt2, const float *bias, float *y,
                              const long *cols, int W, int act, const int NV, const int TAIL) {
    const int C = 8 * NV + 4 * TAIL;
    for (int j = 0; j < W; j++) {
        if (PF_AHEAD > 0 && bottom && j + PF_AHEAD < W) { /* the row below is the one read for the first time */
            const int n_ = (j > 0 && j + 2 < W ? 2 : 1) * C * 4;
            const char *p_ = (const char *)(x + dn + (long)(j + PF_AHEAD) * xs);
            for (int o = 0; o < n_; o += 64) __builtin_prefetch(p_ + o, 0, 3);
            if (x2) {
                p_ = (const char *)(x2 + dn + (long)(j + PF_AHEAD) * xs);
                for (int o = 0; o < n_; o += 64) __builtin_prefetch(p_ + o, 0, 3);
            }
        }
        if (j > 0 && j + 2 < W) { /* pixels j and j + 1 */
            DW_VARS(a);
            DW_VARS(b);
            if (bias) {
#define LOAD_BIAS2(v, k) a##k = b##k = load8_(bias + 8 * (k))
                DW_EACH(a, LOAD_BIAS2);
#undef LOAD_BIAS2
                if (TAIL) at = bt = load4_(bias + 8 * NV);
            }
            DW_CONV2(a, b, x, wt);
            if (act) {
                dw_gelu_regs(&a0, &a1, &a2, &a3, &a4, &a5, &at, NV, TAIL);
                dw_gelu_regs(&b0, &b1, &b2, &b3, &b4, &b5, &bt, NV, TAIL);
            }
            if (x2) {
                DW_VARS(g);
                DW_VARS(h);
                DW_CONV2(g, h, x2, wt2);
#define MUL2(v, k) do { a##k *= g##k; b##k *= h##k; } while (0)
                DW_EACH(a, MUL2);
#undef MUL2
                if (TAIL) { at *= gt; bt *= ht; }
            }
            float *oa = y + cols[j] * C, *ob = y + cols[j + 1] * C;
#define STORE2(v, k) do { memcpy(oa + 8 * (k), &a##k, sizeof(v8f)); memcpy(ob + 8 * (k), &b##k, sizeof(v8f)); } while (0)
            DW_EACH(a, STORE2);
#undef STORE2
            if (TAIL) { memcpy(oa + 8 * NV, &at, sizeof at); memcpy(ob + 8 * NV, &bt, sizeof bt); }
            j++;
            continue;
        }
        DW_VARS(a);
        if (bias) {
#define LOAD_BIAS(v, k) v = load8_(bias + 8 * (k))
            DW_EACH(a, LOAD_BIAS);
#undef LOAD_BIAS
            if (TAIL) at = load4_(bias + 8 * NV);
        }
        DW_CONV(a, x, wt);
        if (act) {
            if (NV == 1) a0 = gelu8(a0);
            if (NV >= 2) gelu8x2(&a0, &a1);
            if (NV == 3) a2 = gelu8(a2);
            if (NV >= 4) gelu8x2(&a2, &a3);
            if (NV == 5) a4 = gelu8(a4);
            if (NV >= 6) gelu8x2(&a4, &a5);
            if (TAIL) at = gelu4(at);
        }
        if (x2) {
            DW_VARS(g);
            DW_CONV(g, x2, wt2);
#define MUL(v, k) v *= g##k
            DW_EACH(a, MUL);
#undef MUL
            if (TAIL) at *= gt;
        }
        float *out = y + cols[j] * C;
#define STORE(v, k) memcpy(out + 8 * (k), &v, sizeof(v8f))
        DW_EACH(a, STORE);
#undef STORE
        if (TAIL) memcpy(out + 8 * NV, &at, sizeof at);
    }
}

/* Depthwise 3x3 conv, zero padding 1; wt (9, C) tap-major, bias may be NULL; act 1: GELU.
 * With x2/wt2 (same pixels, no bias): out = act(dw(x)) * dw2(x2), the GFN gate.
 * row_sums (B*H, C) or NULL (layout 0 only): the sum of every output row over its pixels.
 * nsplit > 1 (no bias, gate or sums): the map holds nsplit parts of C channels side by side
 * (wt nsplit x (9, C)), each conv written as a map of its own, the parts one after the
 * other in y; every input row is read once for all of them (q, k and v of a qkv map). */
void dwconv3x3(const float *x, long xs, const float *wt, const float *bias,
               const float *x2, const float *wt2, float *y, float *row_sums, int B, int H, int W,
               int C, int nsplit, int act, int layout, int threads) {
    long cols[W];
    for (int j = 0; j < W; j++) cols[j] = col_part(layout, j, H, W);
    const long rs = (long)W * xs, part = (long)B * H * W * C;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long bi = 0; bi < (long)B * H; bi++) {
        int i = bi % H;
        const float *xr2 = x2 ? x2 + bi * rs : NULL;
        float *yr = NULL;
        for (int sp = 0; sp < nsplit; sp++) {
        const float *xr = x + bi * rs + sp * C, *wts = wt + sp * 9 * C;
        yr = y + sp * part + row_part(layout, bi / H, i, H, W) * C;
#define REG(nv, tail) dw_row_reg(xr, xr2, xs, -rs, rs, i > 0, i < H - 1, wts, wt2, bias, yr, cols, W, act, nv, tail)
#define ROW(c) dw_row(xr, xr2, xs, rs, i > 0, i < H - 1, wts, wt2, bias, yr, cols, W, act, c)
        BY_REG_WIDTH(C, REG, BY_CHANNELS(C, ROW));
#undef ROW
#undef REG
        }
        if (row_sums) { /* layout image: the row just written, still in cache */
            float *rs_ = row_sums + bi * C;
            for (int c = 0; c < C; c++) rs_[c] = 0.f;
            for (int j = 0; j < W; j++)
                for (int c = 0; c < C; c++) rs_[c] += yr[(long)j * C + c];
        }
    }
}

/* ------------------------------------------------------------------ token norms */
/* out[g, c] = sqrt(sum over the P tokens of group g of t[g, p, c]^2), t (G, P, C) contiguous */
void token_norms(const float *t, float *out, long G, long P, int C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long g = 0; g < G; g++) {
        float acc[MAX_C] = {0};
        const int n = C <= MAX_C ? C : MAX_C;
        for (long p = 0; p < P; p++) {
            const float *r = t + (g * P + p) * C;
            for (int c = 0; c < n; c++) acc[c] += r[c] * r[c];
        }
        for (int c = 0; c < n; c++) out[g * C + c] = sqrtf(acc[c]);
    }
}

/* ------------------------------------------------------------------ attention output */
/* For every window/group g of 64 tokens (layout 1 meso, 2 global): y = A[g] v[g]
 * (64 x 64 times 64 x d; the rows of v at stride vs, a slice of a qkv tensor), then at the pixel p of token i: out[p] = x[p] + y[i] and
 * z[p] = LayerNorm(out[p]): the attention's residual add and the next LayerNorm,
 * without writing y. d = 8 NV + 4 TAIL. */
#define AV_ROW_FMA(X, s)                                             \
    do {                                                             \
        X##0 += (s) * v0;                                            \
        if (NV > 1) X##1 += (s) * v1;                                \
        if (NV > 2) X##2 += (s) * v2;                                \
        if (NV > 3) X##3 += (s) * v3;                                \
        if (TAIL) X##t += (s) * vt;                                  \
    } while (0)
#define AV_VARS(X) v8f X##0 = {0}, X##1 = {0}, X##2 = {0}, X##3 = {0}; v4f_ X##t = {0}
#define AV_FINISH(X, r)                                                                        \
    do {                                                                                       \
        const int m = i0 + (r);                                                                \
        const long p = member_pixel(org, m);                                                   \
        const float *xp = x + p * xs;                                                          \
        float *op = out + p * d;                                                               \
        v8f t8;                                                                                \
        t8 = X##0 + load8_(xp); memcpy(op, &t8, sizeof t8);                                    \
        if (NV > 1) { t8 = X##1 + load8_(xp + 8); memcpy(op + 8, &t8, sizeof t8); }           \
        if (NV > 2) { t8 = X##2 + load8_(xp + 16); memcpy(op + 16, &t8, sizeof t8); }         \
        if (NV > 3) { t8 = X##3 + load8_(xp + 24); memcpy(op + 24, &t8, sizeof t8); }         \
        if (TAIL) { v4f_ t4 = X##t + load4_(xp + 8 * NV); memcpy(op + 8 * NV, &t4, sizeof t4); } \
        norm_pixel(op, z + p * d, d, ln_g, ln_b, eps);                                         \
    } while (0)

/* Member m of group g (layouts 1 and 2) is pixel o.p0 + (m / 8) o.rs + (m % 8) o.cs: the
 * group's origin, found once per group (integer divisions), then a few adds per member. */
typedef struct { long p0, rs, cs; } origin_t;
static origin_t group_origin(int layout, long g, int H, int W) {
    const long h = H / 8, w = W / 8, b = g / (h * w), gi = (g % (h * w)) / w, gj = g % w;
    origin_t o;
    if (layout == 1) { o.p0 = (b * H + gi * 8) * W + gj * 8; o.rs = W; o.cs = 1; }
    else { o.p0 = (b * H + gi) * W + gj; o.rs = h * W; o.cs = w; }
    return o;
}
ALWAYS_INLINE long member_pixel(origin_t o, int m) { return o.p0 + (m >> 3) * o.rs + (m & 7) * o.cs; }

#define AV_STORE(X, r)                                                                         \
    do {                                                                                       \
        float *op = buf + (i0 + (r)) * d;                                                      \
        memcpy(op, &X##0, sizeof(v8f));                                                        \
        if (NV > 1) memcpy(op + 8, &X##1, sizeof(v8f));                                        \
        if (NV > 2) memcpy(op + 16, &X##2, sizeof(v8f));                                       \
        if (NV > 3) memcpy(op + 24, &X##3, sizeof(v8f));                                       \
        if (TAIL) memcpy(op + 8 * NV, &X##t, sizeof(v4f_));                                    \
    } while (0)

/* buf NULL: each row of A v is added to its pixel and normalised at once (meso windows,
 * whose pixels are 8 runs of 8); otherwise the rows are written to buf (64 x d). */
ALWAYS_INLINE void attend_group(const float *A, const float *v, long vs, const float *x, long xs, float *out,
                                float *z, float *buf, long g, int H, int W, const float *ln_g,
                                const float *ln_b, float eps, int layout, const int NV, const int TAIL) {
    const int d = 8 * NV + 4 * TAIL;
    const int R = NV + TAIL <= 3 ? 8 : 4; /* rows at a time: 8 for d <= 24, their sums in registers */
    const origin_t org = buf ? (origin_t){0, 0, 0} : group_origin(layout, g, H, W);
    for (int i0 = 0; i0 < 64; i0 += R) {
        AV_VARS(p); AV_VARS(q); AV_VARS(r); AV_VARS(s);
        AV_VARS(e); AV_VARS(f); AV_VARS(h); AV_VARS(o);
        const float *a0 = A + i0 * 64, *a1 = a0 + 64, *a2 = a1 + 64, *a3 = a2 + 64;
        const float *a4 = a3 + 64, *a5 = a4 + 64, *a6 = a5 + 64, *a7 = a6 + 64;
        for (int j = 0; j < 64; j++) {
            const float *vj = v + j * vs;
            v8f v0 = load8_(vj), v1 = {0}, v2 = {0}, v3 = {0};
            v4f_ vt = {0};
            if (NV > 1) v1 = load8_(vj + 8);
            if (NV > 2) v2 = load8_(vj + 16);
            if (NV > 3) v3 = load8_(vj + 24);
            if (TAIL) vt = load4_(vj + 8 * NV);
            AV_ROW_FMA(p, a0[j]);
            AV_ROW_FMA(q, a1[j]);
            AV_ROW_FMA(r, a2[j]);
            AV_ROW_FMA(s, a3[j]);
            if (R == 8) {
                AV_ROW_FMA(e, a4[j]);
                AV_ROW_FMA(f, a5[j]);
                AV_ROW_FMA(h, a6[j]);
                AV_ROW_FMA(o, a7[j]);
            }
        }
        if (buf) {
            AV_STORE(p, 0); AV_STORE(q, 1); AV_STORE(r, 2); AV_STORE(s, 3);
            if (R == 8) { AV_STORE(e, 4); AV_STORE(f, 5); AV_STORE(h, 6); AV_STORE(o, 7); }
        } else {
            AV_FINISH(p, 0); AV_FINISH(q, 1); AV_FINISH(r, 2); AV_FINISH(s, 3);
            if (R == 8) { AV_FINISH(e, 4); AV_FINISH(f, 5); AV_FINISH(h, 6); AV_FINISH(o, 7); }
        }
    }
}

/* A v of up to 8 neighbouring global groups (gj0 .. gj0 + n - 1 in one grid row gi), then
 * member by member: those groups' members m are n neighbouring pixels of one image row,
 * so the sums and LayerNorms are written in runs of n pixels instead of one by one. */
ALWAYS_INLINE void attend_global_run(const float *A, const float *v, long vs, const float *x, long xs,
                                     float *out, float *z, long g0, int n, int H, int W,
                                     const float *ln_g, const float *ln_b, float eps,
                                     const int NV, const int TAIL) {
    const int d = 8 * NV + 4 * TAIL;
    float buf[8 * 64 * 36] __attribute__((aligned(64))); /* d <= 36 (attend_add_norm checks) */
    for (int u = 0; u < n; u++)
        attend_group(A + (g0 + u) * 4096, v + (g0 + u) * 64 * vs, vs, x, xs, out, z, buf + u * 64 * d,
                     g0 + u, H, W, ln_g, ln_b, eps, 2, NV, TAIL);
    const origin_t org = group_origin(2, g0, H, W);
    for (int m = 0; m < 64; m++) {
        const long p0 = member_pixel(org, m); /* the next groups' members follow it */
        for (int u = 0; u < n; u++) {
            const float *xp = x + (p0 + u) * xs, *yp = buf + (u * 64 + m) * d;
            float *op = out + (p0 + u) * d;
            for (int c = 0; c < d; c++) op[c] = xp[c] + yp[c];
            norm_pixel(op, z + (p0 + u) * d, d, ln_g, ln_b, eps);
        }
    }
}

/* Calls AV(nv, tail) for d = 8 nv + 4 tail, d a multiple of 4 from 12 to 36. */
#define BY_WIDTH(d, AV)                         \
    switch (d) {                                \
    case 12: AV(1, 1); break;                   \
    case 16: AV(2, 0); break;                   \
    case 20: AV(2, 1); break;                   \
    case 24: AV(3, 0); break;                   \
    case 28: AV(3, 1); break;                   \
    case 32: AV(4, 0); break;                   \
    default: AV(4, 1); break; /* 36 */          \
    }

/* returns 0 where d is not one of the compiled widths (a multiple of 4 from 12 to 36) */
int attend_add_norm(const float *A, const float *v, long vs, const float *x, long xs, float *out, float *z,
                    int B, int H, int W, int d, const float *ln_g, const float *ln_b, float eps,
                    int layout, int threads) {
    if ((layout != 1 && layout != 2) || d % 4 || d < 12 || d > 36) return 0;
    const long groups = (long)B * (H / 8) * (W / 8);
    if (layout == 2) { /* runs of 8 groups along each grid row */
        const int w = W / 8, runs = (w + 7) / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long r = 0; r < groups / w * runs; r++) {
            const long g0 = r / runs * w + r % runs * 8;
            const int n = (int)(w - r % runs * 8 < 8 ? w - r % runs * 8 : 8);
#define AV(nv, tail) attend_global_run(A, v, vs, x, xs, out, z, g0, n, H, W, ln_g, ln_b, eps, nv, tail)
            BY_WIDTH(d, AV);
#undef AV
        }
        return 1;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long g = 0; g < groups; g++) {
        const float *Ag = A + g * 64 * 64, *vg = v + g * 64 * vs;
#define AV(nv, tail) attend_group(Ag, vg, vs, x, xs, out, z, NULL, g, H, W, ln_g, ln_b, eps, layout, nv, tail)
        BY_WIDTH(d, AV);
#undef AV
    }
    return 1;
}

/* ------------------------------------------------------------------ attention scores */
/* For every group g of 64 tokens: A[g] = softmax over keys of (scale q k^T + bias), the
 * attention matrix of a computing unit. q and k are rows of d floats at stride ts within
 * a group and gs between groups (slices of one qkv tensor); bias (64, 64). Two query
 * rows at a time against all 64 keys, the keys transposed into a d x 64 block first. */
#define MAX_D 64
ALWAYS_INLINE void softmax_row(v8f *s, const float *bias_row, float *out) {
    for (int u = 0; u < 8; u++) s[u] += load8_(bias_row + 8 * u);
    v8f m = s[0];
    for (int u = 1; u < 8; u++) m = select8(s[u] > m, s[u], m);
    float mx = m[0];
    for (int l = 1; l < 8; l++) mx = m[l] > mx ? m[l] : mx;
    v8f tot = {0};
    for (int u = 0; u < 8; u++) { s[u] = exp8(s[u] - mx); tot += s[u]; }
    const float sum = ((tot[0] + tot[4]) + (tot[1] + tot[5])) + ((tot[2] + tot[6]) + (tot[3] + tot[7]));
    const float inv = 1.f / sum;
    for (int u = 0; u < 8; u++) { v8f o = s[u] * inv; memcpy(out + 8 * u, &o, sizeof o); }
}

void attention_scores(const float *q, const float *k, long ts, long gs, const float *bias,
                      float scale, float *A, long G, int d, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long g = 0; g < G; g++) {
        float kt[MAX_D * 64] __attribute__((aligned(64)));
        const float *qg = q + g * gs, *kg = k + g * gs;
        for (int j = 0; j < 64; j++)
            for (int c = 0; c < d; c++) kt[c * 64 + j] = kg[j * ts + c];
        float *Ag = A + g * 64 * 64;
        for (int i = 0; i < 64; i += 2) {
            const float *q0 = qg + i * ts, *q1 = q0 + ts;
            v8f s0[8] = {0}, s1[8] = {0};
            for (int c = 0; c < d; c++) {
                const float a = q0[c], b = q1[c];
                for (int u = 0; u < 8; u++) {
                    const v8f kv = load8_(kt + c * 64 + 8 * u);
                    s0[u] += a * kv;
                    s1[u] += b * kv;
                }
            }
            for (int u = 0; u < 8; u++) { s0[u] *= scale; s1[u] *= scale; }
            softmax_row(s0, bias + i * 64, Ag + i * 64);
            softmax_row(s1, bias + (i + 1) * 64, Ag + (i + 1) * 64);
        }
    }
}

/* ------------------------------------------------------------------ small products */
/* y[m] = act(x[m] W^T + bias) (+ add[m]) for M rows of K floats at stride xs, W given
 * transposed (K, N); act 0 none, 1 GELU, 2 sigmoid. R rows at a time against NC = 8 NV +
 * 4 TAIL outputs, the accumulators in registers: where N and K are small (1x1 convs of
 * 12-48 channels) oneDNN reaches only a third to a half of the machine's rate. Wider
 * products run as column chunks of 24 while the rows are in cache; ldn is the row stride
 * of W^T and y (the full N), lda that of add. */
#define LIN_MAX_R 8
ALWAYS_INLINE v8f sigmoid8(v8f x) { return 1.0f / (1.0f + exp8(-x)); }

ALWAYS_INLINE v4f_ sigmoid4(v4f_ x) {
    v8f w = sigmoid8(__builtin_shufflevector(x, x, 0, 1, 2, 3, 0, 1, 2, 3));
    return __builtin_shufflevector(w, w, 0, 1, 2, 3);
}

/* the input of a product: up to LIN_MAX_SEG maps side by side (linear_small takes 4) (a concatenation over
 * channels that is never written out), segment s with k[s] channels, rows at stride xs[s] */
#define LIN_MAX_SEG 9
typedef struct {
    const float *x[LIN_MAX_SEG];
    long xs[LIN_MAX_SEG];
    int k[LIN_MAX_SEG];
    int n;
    int split_sums; /* sum each segment on its own, then the segments' sums (bias first) */
} segs_t;

ALWAYS_INLINE void linear_rows(const segs_t *sg, long m0, const float *wt, const float *bias,
                               const float *add, long lda, float *y, long ldn, int act,
                               const int R, const int NV, const int TAIL) {
    v8f acc[LIN_MAX_R][3];
    v4f_ acct[LIN_MAX_R];
    for (int r = 0; r < R; r++) {
        for (int v = 0; v < NV; v++) acc[r][v] = bias ? load8_(bias + 8 * v) : (v8f){0};
        if (TAIL) acct[r] = bias ? load4_(bias + 8 * NV) : (v4f_){0};
    }
    v8f tot[LIN_MAX_R][3];
    v4f_ tott[LIN_MAX_R];
    const float *wk = wt;
    for (int s = 0; s < sg->n; s++) {
        const long xs = sg->xs[s];
        const float *x = sg->x[s] + m0 * xs;
        if (sg->split_sums) /* the running total so far (the bias at first); this segment from 0 */
            for (int r = 0; r < R; r++) {
                for (int v = 0; v < NV; v++) { tot[r][v] = s ? tot[r][v] + acc[r][v] : acc[r][v]; acc[r][v] = (v8f){0}; }
                if (TAIL) { tott[r] = s ? tott[r] + acct[r] : acct[r]; acct[r] = (v4f_){0}; }
            }
        for (int k = 0; k < sg->k[s]; k++, wk += ldn) {
            v8f w[3];
            for (int v = 0; v < NV; v++) w[v] = load8_(wk + 8 * v);
            v4f_ wtl = TAIL ? load4_(wk + 8 * NV) : (v4f_){0};
            for (int r = 0; r < R; r++) {
                const float a = x[r * xs + k];
                for (int v = 0; v < NV; v++) acc[r][v] += a * w[v];
                if (TAIL) acct[r] += a * wtl;
            }
        }
    }
    if (sg->split_sums)
        for (int r = 0; r < R; r++) {
            for (int v = 0; v < NV; v++) acc[r][v] += tot[r][v];
            if (TAIL) acct[r] += tott[r];
        }
    for (int r = 0; r < R; r++) {
        float *yr = y + (m0 + r) * ldn;
        const float *ar = add ? add + (m0 + r) * lda : NULL;
        if (act == 1) {
            int v = 0;
            for (; v + 1 < NV; v += 2) gelu8x2(&acc[r][v], &acc[r][v + 1]);
            if (v < NV) acc[r][v] = gelu8(acc[r][v]);
        } else if (act == 2) {
            for (int v = 0; v < NV; v++) acc[r][v] = sigmoid8(acc[r][v]);
        }
        for (int v = 0; v < NV; v++) {
            v8f o = acc[r][v];
            if (ar) o += load8_(ar + 8 * v);
            memcpy(yr + 8 * v, &o, sizeof o);
        }
        if (TAIL) {
            v4f_ o = acct[r];
            if (act == 1) o = gelu4(o);
            else if (act == 2) o = sigmoid4(o);
            if (ar) o += load4_(ar + 8 * NV);
            memcpy(yr + 8 * NV, &o, sizeof o);
        }
    }
}

/* rows [m0, m0 + R) (the whole block R or, at the end, one row at a time) */
ALWAYS_INLINE void linear_block(const segs_t *sg, const float *wt, const float *bias, const float *add,
                                long lda, float *y, long ldn, long m0, long M, int act, const int R,
                                const int NV, const int TAIL) {
    if (m0 + R <= M) {
        linear_rows(sg, m0, wt, bias, add, lda, y, ldn, act, R, NV, TAIL);
        return;
    }
    for (long m = m0; m < M; m++) linear_rows(sg, m, wt, bias, add, lda, y, ldn, act, 1, NV, TAIL);
}

/* returns 0 where N is neither 16 nor 32 nor a multiple of 12, or nseg not 1 to 4. Rows go
 * in blocks of 8 (split over the threads); each block runs against column chunks of 24
 * outputs (8 rows x 3 vectors: 24 accumulators in registers) while its rows are in cache,
 * and a last chunk of 12 or 16. */
/* the 8-row block at m0 (or the rows left of it) against all N outputs, in column chunks */
ALWAYS_INLINE void linear_block_all(const segs_t *sg, const float *wt, const float *bias, const float *add,
                                    long lda, float *y, long M, int N, long m0, int act) {
    int c = 0;
#define CHUNK(nv, tail) linear_block(sg, wt + c, bias ? bias + c : NULL, add ? add + c : NULL, lda, \
                                     y + c, N, m0, M, act, 8, nv, tail)
    for (; c + 24 <= N; c += 24) CHUNK(3, 0);
    if (N - c == 16) CHUNK(2, 0);
    else if (N - c == 12) CHUNK(1, 1);
    else if (N - c == 8) CHUNK(1, 0);
#undef CHUNK
}

int linear_small(const float *const *xp, const long *xsv, const int *kv, int nseg, const float *wt,
                 const float *bias, const float *add, long lda, float *y, long M, int N, int act,
                 int threads) {
    if (N != 16 && N != 32 && N % 12) return 0;
    if (nseg < 1 || nseg > 4) return 0;
    segs_t sg = {.n = nseg};
    for (int s = 0; s < nseg; s++) { sg.x[s] = xp[s]; sg.xs[s] = xsv[s]; sg.k[s] = kv[s]; }
    const long blocks = (M + 7) / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++) linear_block_all(&sg, wt, bias, add, lda, y, M, N, b * 8, act);
    return 1;
}

/* ------------------------------------------------------------------ NHWC -> NCHW */
/* y (B, C, H, W) contiguous = x (B, H, W, C), pixels at stride xs: tiles of 16 pixels x
 * 16 channels, so that both the reads and the writes go a cache line at a time (PyTorch's
 * copy of a permuted map goes element by element). */
void nhwc_to_nchw(const float *x, long xs, float *y, int B, int H, int W, int C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long bi = 0; bi < (long)B * H; bi++) {
        const long b = bi / H, i = bi % H;
        const float *xr = x + bi * W * xs;
        float *yb = y + b * C * H * W + i * W;
        for (int j0 = 0; j0 < W; j0 += 16) {
            const int nj = W - j0 < 16 ? W - j0 : 16;
            for (int c0 = 0; c0 < C; c0 += 16) {
                const int nc = C - c0 < 16 ? C - c0 : 16;
                float t[16][16];
                for (int j = 0; j < nj; j++)
                    for (int c = 0; c < nc; c++) t[c][j] = xr[(long)(j0 + j) * xs + c0 + c];
                for (int c = 0; c < nc; c++) {
                    float *yc = yb + (long)(c0 + c) * H * W + j0;
                    for (int j = 0; j < nj; j++) yc[j] = t[c][j];
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ channel attention */
/* For every group g of P tokens (rows of C floats, q, k, v at group stride gs, row stride
 * C): A = softmax over j of (q_i . k_j) * (temperature / (|q_i| |k_j|)) (C x C; |.| the
 * L2 norm over the tokens, at least 1e-12), M^T = A^T W_o^T, and y[p] = v[p] M^T: the
 * channel attention of ASID's CAM with its output projection, y = (v A^T) W_o^T, all in
 * cache per group; y (G, P, C) contiguous. woT is W_o transposed (C x C). C a multiple of
 * 8, at most 48. */
#define CA_MAX 48
/* acc[r][.] (R rows, NV vectors) += sum over n of a(r, n) * b[n * bs + .] */
#define CA_TILE(R, NV, NSTEPS, A_OF, B_ROW)                                              \
    do {                                                                                 \
        for (int r = 0; r < (R); r++)                                                    \
            for (int u = 0; u < (NV); u++) acc[r][u] = (v8f){0};                         \
        for (long n = 0; n < (NSTEPS); n++) {                                            \
            const float *b_ = (B_ROW);                                                   \
            v8f bv[6];                                                                   \
            for (int u = 0; u < (NV); u++) bv[u] = load8_(b_ + 8 * u);                   \
            for (int r = 0; r < (R); r++) {                                              \
                const float a_ = (A_OF);                                                 \
                for (int u = 0; u < (NV); u++) acc[r][u] += a_ * bv[u];                  \
            }                                                                            \
        }                                                                                \
    } while (0)

ALWAYS_INLINE void ca_group(const float *q, const float *k, const float *v, long P, float temperature,
                            const float *woT, float *y, const int NV) {
    const int C = 8 * NV;
    float A[CA_MAX * CA_MAX] __attribute__((aligned(64)));
    float MT[CA_MAX * CA_MAX] __attribute__((aligned(64)));
    float nq[CA_MAX], nk[CA_MAX];
    v8f acc[4][6];
    /* the token norms, summed over the tokens in order */
    v8f sq[6] = {0}, sk[6] = {0};
    for (long p = 0; p < P; p++)
        for (int u = 0; u < NV; u++) {
            const v8f a = load8_(q + p * C + 8 * u), b = load8_(k + p * C + 8 * u);
            sq[u] += a * a;
            sk[u] += b * b;
        }
    for (int u = 0; u < NV; u++) {
        memcpy(nq + 8 * u, &sq[u], sizeof(v8f));
        memcpy(nk + 8 * u, &sk[u], sizeof(v8f));
    }
    for (int c = 0; c < C; c++) {
        nq[c] = sqrtf(nq[c]); nq[c] = nq[c] > 1e-12f ? nq[c] : 1e-12f;
        nk[c] = sqrtf(nk[c]); nk[c] = nk[c] > 1e-12f ? nk[c] : 1e-12f;
    }
    /* Gram rows i .. i + 3: sum over the tokens of q[p][i] k[p][.]; then scaled and
     * softmax-ed, row by row */
    for (int i = 0; i < C; i += 4) {
        CA_TILE(4, NV, P, q[n * C + i + r], k + n * C);
        for (int r = 0; r < 4; r++) {
            v8f m8 = {0};
            for (int u = 0; u < NV; u++) {
                acc[r][u] *= temperature / (nq[i + r] * load8_(nk + 8 * u));
                m8 = u == 0 ? acc[r][0] : select8(acc[r][u] > m8, acc[r][u], m8);
            }
            float mx = m8[0];
            for (int l = 1; l < 8; l++) mx = m8[l] > mx ? m8[l] : mx;
            v8f tot = {0};
            for (int u = 0; u < NV; u++) { acc[r][u] = exp8(acc[r][u] - mx); tot += acc[r][u]; }
            const float sum = ((tot[0] + tot[4]) + (tot[1] + tot[5])) + ((tot[2] + tot[6]) + (tot[3] + tot[7]));
            const float inv = 1.f / sum;
            for (int u = 0; u < NV; u++) {
                const v8f o = acc[r][u] * inv;
                memcpy(A + (i + r) * C + 8 * u, &o, sizeof o);
            }
        }
    }
    /* M^T rows c .. c + 3: sum over j of A[j][c] W_o^T[j][.] */
    for (int c = 0; c < C; c += 4) {
        CA_TILE(4, NV, C, A[n * C + c + r], woT + n * C);
        for (int r = 0; r < 4; r++)
            for (int u = 0; u < NV; u++) memcpy(MT + (c + r) * C + 8 * u, &acc[r][u], sizeof(v8f));
    }
    /* y rows p .. p + 3: v[p] M^T */
    long p = 0;
    for (; p + 4 <= P; p += 4) {
        CA_TILE(4, NV, C, v[(p + r) * C + n], MT + n * C);
        for (int r = 0; r < 4; r++)
            for (int u = 0; u < NV; u++) memcpy(y + (p + r) * C + 8 * u, &acc[r][u], sizeof(v8f));
    }
    for (; p < P; p++) {
        CA_TILE(1, NV, C, v[p * C + n], MT + n * C);
        for (int u = 0; u < NV; u++) memcpy(y + p * C + 8 * u, &acc[0][u], sizeof(v8f));
    }
}

/* returns 0 where C is not a multiple of 8 up to CA_MAX */
int channel_attention(const float *q, const float *k, const float *v, long gs, long G, long P, int C,
                      float temperature, const float *woT, float *y, int threads) {
    if (C % 8 || C < 8 || C > CA_MAX) return 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long g = 0; g < G; g++) {
        const float *qg = q + g * gs, *kg = k + g * gs, *vg = v + g * gs;
        float *yg = y + g * P * C;
        switch (C / 8) {
        case 1: ca_group(qg, kg, vg, P, temperature, woT, yg, 1); break;
        case 2: ca_group(qg, kg, vg, P, temperature, woT, yg, 2); break;
        case 3: ca_group(qg, kg, vg, P, temperature, woT, yg, 3); break;
        case 4: ca_group(qg, kg, vg, P, temperature, woT, yg, 4); break;
        case 5: ca_group(qg, kg, vg, P, temperature, woT, yg, 5); break;
        default: ca_group(qg, kg, vg, P, temperature, woT, yg, 6); break;
        }
    }
    return 1;
}

/* ------------------------------------------------------------------ GFN gate and output */
/* y = (GELU(dw(x)) * dw2(x2)) W^T + add, row by row: each image row of the gate (C
 * channels) is computed into a buffer of the thread and multiplied by W (woT: C x N) while
 * it is in cache, so that the gate is never written out. x, x2: NHWC maps at pixel stride
 * xs; add (pixels at stride lda) and y (N per pixel) in image order. Returns 0 where C or
 * N is not a compiled width (C of dwconv3x3's registers forms, N as linear_small). */
int gate_linear(const float *x, const float *x2, long xs, const float *wt, const float *wt2, int B, int H,
                int W, int C, const float *woT, const float *add, long lda, float *y, int N, int threads) {
    if (!(C == 12 || C == 16 || C == 24 || C == 32 || C == 36 || C == 48)) return 0;
    if (N != 16 && N != 32 && N % 12) return 0;
    const long rs = (long)W * xs;
    float *bufs = malloc(sizeof(float) * (size_t)threads * W * C); /* a row of the gate per thread */
    long *cols = malloc(sizeof(long) * (size_t)W);
    if (!bufs || !cols) { free(bufs); free(cols); return 0; }
    for (int j = 0; j < W; j++) cols[j] = j;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long bi = 0; bi < (long)B * H; bi++) {
        const int i = bi % H;
        float *buf = bufs + (size_t)omp_get_thread_num() * W * C;
        const float *xr = x + bi * rs, *xr2 = x2 + bi * rs;
#define REG(nv, tail) dw_row_reg(xr, xr2, xs, -rs, rs, i > 0, i < H - 1, wt, wt2, NULL, buf, cols, W, 1, nv, tail)
        BY_REG_WIDTH(C, REG, REG(6, 0) /* 48: the callers check */);
#undef REG
        segs_t sg = {.x = {buf}, .xs = {C}, .k = {C}, .n = 1};
        const float *ar = add ? add + bi * W * lda : NULL;
        for (long m0 = 0; m0 < W; m0 += 8)
            linear_block_all(&sg, woT, NULL, ar, lda, y + bi * W * N, W, N, m0, 0);
    }
    free(bufs);
    free(cols);
    return 1;
}

/* ------------------------------------------------------------------ LayerNorm and product */
/* y = LayerNorm(x) W^T (+ bias) written as tokens in `layout` order (0 image, 1 meso, 2
 * global): the LayerNorm of 8 tokens at a time into a buffer of the thread, then their
 * product while they are in cache, so that the normalised map is never written out (the
 * same arithmetic as layer_norm and linear_small). K at most MAX_C; returns 0 where N is
 * not one of linear_small's widths or the layout is not one of these. */
ALWAYS_INLINE void norm_tokens8(const float *x, long xs, float *buf, long t0, int n, int K, const float *g,
                                const float *be, float eps, int layout, int H, int W) {
    const origin_t org = layout == 0 ? (origin_t){t0, 0, 1} : group_origin(layout, t0 / 64, H, W);
    for (int r = 0; r < n; r++) { /* the 8 tokens are members of one group (or pixels in a row) */
        const long p = layout == 0 ? t0 + r : member_pixel(org, (int)((t0 + r) % 64));
        norm_pixel(x + p * xs, buf + r * K, K, g, be, eps);
    }
}

int norm_linear(const float *x, long xs, int B, int H, int W, int K, const float *g, const float *be,
                float eps, int layout, const float *wt, const float *bias, float *y, int N, int threads) {
    if (N != 16 && N != 32 && N % 12) return 0;
    if (layout < 0 || layout > 2 || K > MAX_C) return 0;
    const long M = (long)B * H * W, blocks = (M + 7) / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++) {
        float buf[8 * MAX_C] __attribute__((aligned(64)));
        const int n = M - b * 8 < 8 ? (int)(M - b * 8) : 8;
#define NORM(c) norm_tokens8(x, xs, buf, b * 8, n, c, g, be, eps, layout, H, W)
        BY_CHANNELS(K, NORM)
#undef NORM
        segs_t sg = {.x = {buf}, .xs = {K}, .k = {K}, .n = 1};
        linear_block_all(&sg, wt, bias, NULL, 0, y + b * 8 * N, n, N, 0, 0);
    }
    return 1;
}

/* ------------------------------------------------------------------ 3x3 convs as products */
#define UP_MAX_C 64
/* one row (b, i) of a 3x3 conv (padding 1) of an NHWC map as a product with 9 C inputs per
 * pixel into yrow (W x Np): each 8-pixel block reads its nine taps where they are (a zero
 * row outside the map, a zero-padded copy at the left and right edges), each tap's C
 * products summed on their own and then the nine sums */
static void conv3x3_row(const float *x, long xs, long bi, int i, int H, int W, int C, const float *wt,
                        const float *bias, int Np, float *yrow) {
    static const float zeros[UP_MAX_C];
    float edge[3 * 10 * UP_MAX_C]; /* rows i-1..i+1, pixels j0-1..j0+8, zero outside */
    for (int j0 = 0; j0 < W; j0 += 8) {
        const int n = W - j0 < 8 ? W - j0 : 8;
        const int inner = j0 > 0 && j0 + n < W;
        if (!inner) {
            memset(edge, 0, sizeof(float) * 3 * 10 * C);
            for (int di = -1; di <= 1; di++) {
                if (i + di < 0 || i + di >= H) continue;
                for (int u = 0; u < n + 2; u++) {
                    const int j = j0 - 1 + u;
                    if (j < 0 || j >= W) continue;
                    memcpy(edge + ((di + 1) * 10 + u) * C, x + ((bi + di) * W + j) * xs, sizeof(float) * C);
                }
            }
        }
        segs_t sg = {.n = 9, .split_sums = 1};
        for (int t = 0; t < 9; t++) {
            const int di = t / 3 - 1, dj = t % 3 - 1;
            sg.k[t] = C;
            if (i + di < 0 || i + di >= H) { sg.x[t] = zeros; sg.xs[t] = 0; }
            else if (inner) { sg.x[t] = x + ((bi + di) * W + j0 + dj) * xs; sg.xs[t] = xs; }
            else { sg.x[t] = edge + ((di + 1) * 10 + dj + 1) * C; sg.xs[t] = C; }
        }
        linear_block_all(&sg, wt, bias, NULL, 0, yrow + (long)j0 * Np, n, Np, 0, 0);
    }
}

/* y (B, H, W, Np) = the 3x3 conv (padding 1, with bias) of the NHWC map x (C channels at pixel
 * stride xs); wt (9 C, Np) tap-major. Returns 0 where Np is not a width of linear_small. */
int conv3x3(const float *x, long xs, int B, int H, int W, int C, const float *wt, const float *bias, int Np,
            float *y, int threads) {
    if (Np != 16 && Np != 32 && Np % 12) return 0;
    if (C > UP_MAX_C) return 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long bi = 0; bi < (long)B * H; bi++)
        conv3x3_row(x, xs, bi, bi % H, H, W, C, wt, bias, Np, y + bi * W * Np);
    return 1;
}

/* The last conv (3x3, padding 1, C -> N = 3 s^2, with bias) of an NHWC map x (B, H, W, C at
 * pixel stride xs) and the pixel shuffle, written straight into the NCHW image out
 * (B, 3, Ho, Wo), cropped to Ho <= s H, Wo <= s W; conv3x3_row computes each row; wt (9 C,
 * Np) tap-major, Np >= N a width of linear_small (zero columns beyond N). */
int upsample_conv(const float *x, long xs, int B, int H, int W, int C, const float *wt, const float *bias,
                  int Np, int s, float *out, int Ho, int Wo, int threads) {
    if (Np != 16 && Np != 32 && Np % 12) return 0;
    if (C > UP_MAX_C || 3 * s * s > Np) return 0;
    float *bufs = malloc(sizeof(float) * (size_t)threads * W * Np);
    if (!bufs) return 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long bi = 0; bi < (long)B * H; bi++) {
        const long b = bi / H;
        const int i = bi % H;
        float *yrow = bufs + (size_t)omp_get_thread_num() * W * Np;
        conv3x3_row(x, xs, bi, i, H, W, C, wt, bias, Np, yrow);
        /* pixel shuffle: output o = (ch s + a) s + b' of LR pixel (i, j) -> (ch, i s + a, j s + b') */
        for (int ch = 0; ch < 3; ch++)
            for (int a = 0; a < s; a++) {
                const int oi = i * s + a;
                if (oi >= Ho) continue;
                float *orow = out + ((b * 3 + ch) * (long)Ho + oi) * Wo;
                const float *src = yrow + (ch * s + a) * s;
                for (int j = 0; j < W; j++)
                    for (int bb = 0; bb < s; bb++) {
                        const int oj = j * s + bb;
                        if (oj < Wo) orow[oj] = src[(long)j * Np + bb];
                    }
            }
    }
    free(bufs);
    return 1;
}

/* ------------------------------------------------------------------ the whole GFN */
/* y = (GELU(dw(h1)) * dw2(h2)) W_out^T + add with [h1 h2] = x W_in^T: ASID's gated
 * feed-forward on an NHWC map x (d channels at pixel stride xs), row by row. Each thread
 * takes a band of rows; the 2d-channel rows of the first product are kept in a ring of
 * three (the row above, this one, the row below), so neither that map nor the gate is ever
 * written out. winT (d, 2d), woT (d, d), taps wt/wt2 (9, d); add at pixel stride lda; y
 * (d per pixel). The same arithmetic as linear_small, dwconv3x3 and gate_linear. Returns 0
 * where d is not 12, 16, 24, 32, 36 or 48. */
int gfn_rows(const float *x, long xs, int B, int H, int W, int d, const float *winT, const float *wt,
             const float *wt2, const float *woT, const float *add, long lda, float *y, int threads) {
    if (!(d == 12 || d == 16 || d == 24 || d == 32 || d == 36 || d == 48)) return 0;
    const long rows = (long)B * H, rowlen = (long)W * 2 * d;
    float *mem = malloc(sizeof(float) * (size_t)threads * (3 * rowlen + (long)W * d));
    long *cols = malloc(sizeof(long) * (size_t)W);
    if (!mem || !cols) { free(mem); free(cols); return 0; }
    for (int j = 0; j < W; j++) cols[j] = j;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        float *ring = mem + (size_t)t * (3 * rowlen + (long)W * d), *gate = ring + 3 * rowlen;
        const long r0 = rows * t / n, r1 = rows * (t + 1) / n;
        long done = -1; /* the last row of the first product in the ring */
        for (long bi = r0; bi < r1; bi++) {
            const int i = bi % H;
            for (long r = (i > 0 && done < bi - 1) ? bi - 1 : (done < bi ? bi : done + 1);
                 r <= bi + (i < H - 1); r++) { /* rows this one needs that are not there yet */
                segs_t sg = {.x = {x + r * W * xs}, .xs = {xs}, .k = {d}, .n = 1};
                float *slot = ring + (r % 3) * rowlen;
                for (long m0 = 0; m0 < W; m0 += 8) linear_block_all(&sg, winT, NULL, NULL, 0, slot, W, 2 * d, m0, 0);
                done = r;
            }
            const float *mid = ring + (bi % 3) * rowlen;
            const long up = ((bi + 2) % 3 - bi % 3) * rowlen, dn = ((bi + 1) % 3 - bi % 3) * rowlen;
#define REG(nv, tail) dw_row_reg(mid, mid + d, 2 * d, up, dn, i > 0, i < H - 1, wt, wt2, NULL, gate, cols, W, 1, nv, tail)
            BY_REG_WIDTH(d, REG, REG(6, 0) /* 48: the callers check */);
#undef REG
            segs_t sg = {.x = {gate}, .xs = {d}, .k = {d}, .n = 1};
            const float *ar = add ? add + bi * W * lda : NULL;
            for (long m0 = 0; m0 < W; m0 += 8) linear_block_all(&sg, woT, NULL, ar, lda, y + bi * W * d, W, d, m0, 0);
        }
    }
    free(mem);
    free(cols);
    return 1;
}

/* ------------------------------------------------------------------ a CAM's q, k, v */
/* q, k, v of the channel attention: LayerNorm of the NHWC map x (d channels at pixel stride
 * xs), the product with W_qkv (wT: d x 3d), then the depthwise 3x3 conv of each third (taps
 * 3 x (9, d)), written as tokens in `layout` order, the three parts one after the other in y.
 * Row by row, as gfn_rows: the 3d-channel rows of the product are kept in a ring of three
 * per thread and never written out. The same arithmetic as norm_linear and dwconv3x3.
 * Returns 0 where d is not 12, 16, 24, 32, 36 or 48, or 3d not a width of linear_small. */
int qkv_rows(const float *x, long xs, int B, int H, int W, int d, const float *g, const float *be, float eps,
             const float *wT, const float *taps, float *y, int layout, int threads) {
    if (!(d == 12 || d == 16 || d == 24 || d == 32 || d == 36 || d == 48)) return 0;
    if ((3 * d) % 12 && 3 * d != 16 && 3 * d != 32) return 0;
    const long rows = (long)B * H, rowlen = (long)W * 3 * d, part = rows * W * d;
    float *mem = malloc(sizeof(float) * (size_t)threads * 3 * rowlen);
    long *cols = malloc(sizeof(long) * (size_t)W);
    if (!mem || !cols) { free(mem); free(cols); return 0; }
    for (int j = 0; j < W; j++) cols[j] = col_part(layout, j, H, W);
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        float *ring = mem + (size_t)t * 3 * rowlen;
        const long r0 = rows * t / n, r1 = rows * (t + 1) / n;
        long done = -1;
        for (long bi = r0; bi < r1; bi++) {
            const int i = bi % H;
            for (long r = (i > 0 && done < bi - 1) ? bi - 1 : (done < bi ? bi : done + 1);
                 r <= bi + (i < H - 1); r++) {
                float *slot = ring + (r % 3) * rowlen;
                for (long m0 = 0; m0 < W; m0 += 8) {
                    float buf[8 * MAX_C] __attribute__((aligned(64)));
                    const int nr = W - m0 < 8 ? (int)(W - m0) : 8;
#define NORM(c) norm_tokens8(x, xs, buf, r * W + m0, nr, c, g, be, eps, 0, H, W)
                    BY_CHANNELS(d, NORM)
#undef NORM
                    segs_t sg = {.x = {buf}, .xs = {d}, .k = {d}, .n = 1};
                    linear_block_all(&sg, wT, NULL, NULL, 0, slot + m0 * 3 * d, nr, 3 * d, 0, 0);
                }
                done = r;
            }
            const float *mid = ring + (bi % 3) * rowlen;
            const long up = ((bi + 2) % 3 - bi % 3) * rowlen, dn = ((bi + 1) % 3 - bi % 3) * rowlen;
            for (int sp = 0; sp < 3; sp++) {
                const float *xr = mid + sp * d, *wts = taps + sp * 9 * d;
                float *yr = y + sp * part + row_part(layout, bi / H, i, H, W) * d;
#define REG(nv, tail) dw_row_reg(xr, NULL, 3 * d, up, dn, i > 0, i < H - 1, wts, NULL, NULL, yr, cols, W, 0, nv, tail)
                BY_REG_WIDTH(d, REG, REG(6, 0) /* 48: the callers check */);
#undef REG
            }
        }
    }
    free(mem);
    free(cols);
    return 1;
}
