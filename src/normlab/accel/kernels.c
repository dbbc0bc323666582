/* normlab's BatchNorm and GroupNorm kernels for channels-last tensors, training mode,
 * optionally with the ReLU before the norm folded in (kernels.py builds and loads this
 * file). GroupNorm covers normlab's LayerNorm (1 group) and InstanceNorm (C groups).
 *
 * A channels-last (N, C, H, W) tensor is n = N*H*W*C values in which channel c sits at every
 * index i with i % C == c. The loops walk it in blocks of L values, L a multiple of both C
 * and 16, so lane j of a block always holds channel j % C; they take 16 lanes at a time in
 * GCC/Clang vector types (the compiler maps them onto whatever vector registers the CPU
 * has). Every sum is one accumulator per lane, added to in order, in double: no sum is
 * reordered, so the result is the same on every CPU, and arithmetic is compiled with
 * -ffp-contract=off for the same reason.
 *
 * Single-threaded, no allocation: the caller passes every buffer.
 */
#include <math.h>
#ifdef __AVX__
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>

#define LMAX 128 /* lanes at most; the caller picks L <= LMAX, L % 16 == 0 */
#define BITMAP_SLACK 32 /* bytes past n / 8 in a dropout bitmap */
#define ROTATE_MAX 4096 /* image sides at most, for nl_rotate_normalize */

typedef float f16v __attribute__((vector_size(64)));     /* 16 floats */
typedef float f8v __attribute__((vector_size(32)));      /* 8 floats */
typedef double d8v __attribute__((vector_size(64)));     /* 8 doubles */
typedef int32_t i16v __attribute__((vector_size(64)));   /* 16 int32 */
typedef uint32_t u16v __attribute__((vector_size(64)));  /* 16 uint32 */
typedef uint16_t h16v __attribute__((vector_size(32)));  /* 16 bf16 bit patterns */

/* 16 values from fp32 or bf16 memory, as floats. */
static inline f16v load_f32(const float *p) { f16v v; memcpy(&v, p, sizeof v); return v; }
static inline f16v load_bf16(const uint16_t *p) {
#ifdef __AVX512F__  /* one widening load: GCC splits the generic conversion in four */
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return (f16v)_mm512_slli_epi32(u, 16);
#else
    h16v h;
    memcpy(&h, p, sizeof h);
    return (f16v)(__builtin_convertvector(h, u16v) << 16);
#endif
}

static inline void store_f32(float *p, f16v v) { memcpy(p, &v, sizeof v); }
/* Round to nearest even, as torch's bfloat16 conversion does; NaN stays a quiet NaN. */
static inline void store_bf16(uint16_t *p, f16v v) {
    u16v u = (u16v)v;
#ifdef __AVX512BF16__
    /* One instruction does the same (RNE, NaN quieted as below) except that it flushes
     * denormal inputs to zero: a vector holding one takes the integer path below. */
    const __m512i bits = (__m512i)u;
    if (!(_mm512_testn_epi32_mask(bits, _mm512_set1_epi32(0x7f800000))
          & _mm512_test_epi32_mask(bits, _mm512_set1_epi32(0x007fffff)))) {
        __m256bh h = _mm512_cvtneps_pbh((__m512)v);
        memcpy(p, &h, sizeof h);
        return;
    }
#endif
    u16v rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    i16v nan = (u & 0x7fffffffu) > 0x7f800000u;
    u16v out = (rounded & ~(u16v)nan) | (((u >> 16) | 0x40u) & (u16v)nan);
    h16v h = __builtin_convertvector(out, h16v);
    memcpy(p, &h, sizeof h);
}

/* ReLU with torch's semantics (NaN passes through); and the identity. */
static inline f16v relu(f16v v) {
#ifdef __AVX512F__  /* max(0, v) is (0 > v) ? 0 : v: a NaN or -0 in v passes, as below */
    return (f16v)_mm512_max_ps(_mm512_setzero_ps(), (__m512)v);
#else
    return (f16v)((u16v)v & ~(u16v)(v < (f16v){0}));
#endif
}
static inline f16v keep(f16v v) { return v; }
/* A gradient r where the ReLU passed x (x > 0), else 0; and r everywhere. */
static inline f16v relu_grad(f16v x, f16v r) {
    return (f16v)((u16v)r & (u16v)(x > (f16v){0}));
}
static inline f16v all_grad(f16v x, f16v r) { (void)x; return r; }

/* A following dropout, folded in: its dropped units are logical (row-major NCHW) indices,
 * sorted. Forward, the norm's output is zeroed there; backward, the output gradient reads
 * as +0 there (what zeroing a copy of it would give, without the copy), through a bitmap
 * over storage offsets built from the indices. */
/* Logical index i = (img * C + c) * HW + hw -> storage offset (img * HW + hw) * C + c, for
 * indices taken in increasing order (as bernoulli_positions gives them) without two
 * divisions each: the plane (img, c) of the last index is kept and stepped forward; an
 * index below it (unsorted input) or far beyond it is placed by division. */
typedef struct { int64_t C, HW, base, img, c; } offsets_t;
static inline offsets_t offsets_start(int64_t C, int64_t HW) {
    offsets_t t = {C, HW, 0, 0, 0};
    return t;
}
static inline int64_t next_offset(offsets_t *t, int64_t i) {
    if (i < t->base || i - t->base >= 8 * t->HW) {  /* far: one division */
        int64_t q = i / t->HW;
        t->base = q * t->HW;
        t->img = q / t->C;
        t->c = q - t->img * t->C;
    }
    while (i - t->base >= t->HW) {
        t->base += t->HW;
        if (++t->c == t->C) { t->c = 0; t->img++; }
    }
    return (t->img * t->HW + (i - t->base)) * t->C + t->c;
}
/* 0 if every index is in [0, n), else -1. */
static int check_drop(const int64_t *drop, int64_t ndrop, int64_t n) {
    for (int64_t k = 0; k < ndrop; k++)
        if (drop[k] < 0 || drop[k] >= n) return -1;
    return 0;
}
/* The bitmap of dropped storage offsets (n / 8 + BITMAP_SLACK bytes), or NULL if none. */
static const uint8_t *drop_bitmap(const int64_t *drop, int64_t ndrop, int64_t n, int64_t C,
                                  int64_t HW, uint8_t *bits) {
    if (ndrop == 0) return NULL;
    memset(bits, 0, (size_t)(n / 8 + BITMAP_SLACK));
    offsets_t t = offsets_start(C, HW);
    for (int64_t k = 0; k < ndrop; k++) {
        int64_t o = next_offset(&t, drop[k]);
        bits[o >> 3] |= (uint8_t)(1u << (o & 7));
    }
    return bits;
}
/* v with the lanes whose units (storage offsets e..e+15) are dropped set to +0. */
static inline f16v drop_lanes(f16v v, const uint8_t *bits, int64_t e) {
    if (!bits) return v;
    uint32_t w;
    memcpy(&w, bits + (e >> 3), sizeof w);
    uint32_t m = (w >> (e & 7)) & 0xffffu;
    if (!m) return v;
    const u16v lane = {1u << 0, 1u << 1, 1u << 2, 1u << 3, 1u << 4, 1u << 5, 1u << 6, 1u << 7,
                       1u << 8, 1u << 9, 1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14,
                       1u << 15};
    return (f16v)((u16v)v & ~(u16v)((lane & m) != 0));
}

/* The sums' passes read 8 values at a time straight into doubles (fewer shuffles than
 * widening 16 floats in two halves; the same values in the same lanes, so the same sums). */
typedef int32_t i8v __attribute__((vector_size(32)));
typedef uint16_t h8v __attribute__((vector_size(16)));
static inline f8v load8_f32(const float *p) { f8v v; memcpy(&v, p, sizeof v); return v; }
static inline f8v load8_bf16(const uint16_t *p) {
#ifdef __AVX2__  /* one widening load: GCC splits the generic conversion in halves */
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return (f8v)_mm256_slli_epi32(u, 16);
#else
    h8v h;
    memcpy(&h, p, sizeof h);
    return (f8v)(__builtin_convertvector(h, i8v) << 16);
#endif
}
static inline f8v relu8(f8v v) {
#ifdef __AVX__  /* as relu's */
    return (f8v)_mm256_max_ps(_mm256_setzero_ps(), (__m256)v);
#else
    return (f8v)((i8v)v & ~(i8v)(v < (f8v){0}));
#endif
}
static inline f8v keep8(f8v v) { return v; }
static inline d8v wide(f8v v) {
#ifdef __AVX512F__  /* one instruction (the generic conversion is two and a shuffle) */
    return (d8v)_mm512_cvtps_pd((__m256)v);
#else
    return __builtin_convertvector(v, d8v);
#endif
}
/* drop_lanes for 8 lanes (storage offsets e..e+7). */
static inline f8v drop8(f8v v, const uint8_t *bits, int64_t e) {
    if (!bits) return v;
    uint32_t w;
    memcpy(&w, bits + (e >> 3), sizeof w);
    uint32_t m = (w >> (e & 7)) & 0xffu;
    if (!m) return v;
    const i8v lane = {1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7};
    return (f8v)((i8v)v & ~(i8v)((lane & (int32_t)m) != 0));
}

/* Without AVX-512, GCC keeps 16-float and 8-double vectors in memory (the sums' double
 * accumulators went through the stack on every step, and the ReLU's 16-lane compare was
 * done one float at a time). So AVX2 builds (x86-64-v3) take 8 floats at a time in the
 * elementwise passes and keep the sums as 4-double vectors: the same operations on the
 * same values in each lane, in the same order, so the same results bit for bit. Other
 * builds compile exactly the 16-lane code below (IF_NARROW drops the AVX2 blocks). */
#if defined(__AVX2__) && !defined(__AVX512F__)
#define IF_NARROW(...) __VA_ARGS__
#else  /* AVX-512 has the wide vectors; for SSE2 alone the 16-lane code measured faster */
#define IF_NARROW(...)
#endif
typedef double d4v __attribute__((vector_size(32)));  /* 4 doubles */
typedef uint32_t u8v __attribute__((vector_size(32)));  /* 8 uint32 */
static inline d4v wide_lo(f8v v) {
#ifdef __AVX__
    return (d4v)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)v));
#else
    return __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), d4v);
#endif
}
static inline d4v wide_hi(f8v v) {
#ifdef __AVX__
    return (d4v)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)v, 1));
#else
    return __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), d4v);
#endif
}
/* relu_grad and all_grad for 8 lanes. */
static inline f8v relu_grad8(f8v x, f8v r) { return (f8v)((i8v)r & (i8v)(x > (f8v){0})); }
static inline f8v all_grad8(f8v x, f8v r) { (void)x; return r; }
static inline void store8_f32(float *p, f8v v) { memcpy(p, &v, sizeof v); }
/* store_bf16 for 8 lanes: the same rounding (no value here exceeds 0xffff before the
 * narrowing, and u & 0x7fffffff is never negative, so the signed compare is the same). */
static inline void store8_bf16_rne(uint16_t *p, f8v v) {
    u8v u = (u8v)v;
    u8v rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    u8v nan = (u8v)((i8v)(u & 0x7fffffffu) > 0x7f800000);
    u8v out = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
#ifdef __AVX2__
    __m128i h = _mm_packus_epi32(_mm256_castsi256_si128((__m256i)out),
                                 _mm256_extracti128_si256((__m256i)out, 1));
    _mm_storeu_si128((__m128i *)p, h);
#else
    h8v h = __builtin_convertvector(out, h8v);
    memcpy(p, &h, sizeof h);
#endif
}

/* Per-channel totals from per-lane sums (lane j holds channel j % C). */
static void fold(const double *lane_a, const double *lane_b, int64_t L, int64_t C,
                 double *a, double *b) {
    for (int64_t c = 0; c < C; c++) a[c] = b[c] = 0.0;
    for (int64_t j = 0; j < L; j++) {
        a[j % C] += lane_a[j];
        b[j % C] += lane_b[j];
    }
}

/* n is a multiple of C but not always of L: the last block is partial. It is handled by
 * copying it into a zero-padded buffer; for sums this adds zeros (exactly), and for the
 * elementwise passes only the real values are copied back. */
#define DEFINE(SUF, T, LOAD, STORE, RELU, GRAD, LOAD8, RELU8, STORE8, GRAD8)                             \
/* Lane sums of v and v*v, v = relu(x) or x. */                                            \
static void stats_##SUF(const T *x, int64_t n, int64_t L, double *s, double *q) {          \
    T pad[LMAX] = {0};                                                                     \
    int64_t full = n / L * L;                                                              \
    memcpy(pad, x + full, (size_t)(n - full) * sizeof(T));                                 \
    IF_NARROW({                                                                            \
        for (int64_t j = 0; j < L; j += 16) {                                              \
            d4v s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};\
            for (int64_t i = 0; i <= full; i += L) {                                       \
                const T *p = i < full ? x + i + j : pad + j;                               \
                f8v u = RELU8(LOAD8(p)), v = RELU8(LOAD8(p + 8));                          \
                d4v a = wide_lo(u), b = wide_hi(u), c = wide_lo(v), e = wide_hi(v);        \
                s0 += a; s1 += b; s2 += c; s3 += e;                                        \
                q0 += a * a; q1 += b * b; q2 += c * c; q3 += e * e;                        \
            }                                                                              \
            memcpy(s + j, &s0, 32); memcpy(s + j + 4, &s1, 32);                            \
            memcpy(s + j + 8, &s2, 32); memcpy(s + j + 12, &s3, 32);                       \
            memcpy(q + j, &q0, 32); memcpy(q + j + 4, &q1, 32);                            \
            memcpy(q + j + 8, &q2, 32); memcpy(q + j + 12, &q3, 32);                       \
        }                                                                                  \
        return;                                                                            \
    })                                                                                     \
    for (int64_t j = 0; j < L; j += 16) {                                                  \
        d8v s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};                                        \
        for (int64_t i = 0; i <= full; i += L) {                                           \
            const T *p = i < full ? x + i + j : pad + j;                                   \
            d8v a = wide(RELU8(LOAD8(p))), b = wide(RELU8(LOAD8(p + 8)));                  \
            s0 += a; s1 += b; q0 += a * a; q1 += b * b;                                    \
        }                                                                                  \
        memcpy(s + j, &s0, 64); memcpy(s + j + 8, &s1, 64);                                \
        memcpy(q + j, &q0, 64); memcpy(q + j + 8, &q1, 64);                                \
    }                                                                                      \
}                                                                                          \
/* y = v * a + b per lane. */                                                              \
static void affine_##SUF(const T *x, T *y, int64_t n, int64_t L, const float *a,           \
                         const float *b) {                                                 \
    T pad[LMAX] = {0}, out[LMAX];                                                          \
    int64_t full = n / L * L;                                                              \
    memcpy(pad, x + full, (size_t)(n - full) * sizeof(T));                                 \
    IF_NARROW({                                                                            \
        for (int64_t j = 0; j < L; j += 8) {                                               \
            f8v av = load8_f32(a + j), bv = load8_f32(b + j);                              \
            for (int64_t i = 0; i < full; i += L)                                          \
                STORE8(y + i + j, RELU8(LOAD8(x + i + j)) * av + bv);                      \
            STORE8(out + j, RELU8(LOAD8(pad + j)) * av + bv);                              \
        }                                                                                  \
        memcpy(y + full, out, (size_t)(n - full) * sizeof(T));                             \
        return;                                                                            \
    })                                                                                     \
    for (int64_t j = 0; j < L; j += 16) {                                                  \
        f16v av = load_f32(a + j), bv = load_f32(b + j);                                   \
        for (int64_t i = 0; i < full; i += L)                                              \
            STORE(y + i + j, RELU(LOAD(x + i + j)) * av + bv);                             \
        STORE(out + j, RELU(LOAD(pad + j)) * av + bv);                                     \
    }                                                                                      \
    memcpy(y + full, out, (size_t)(n - full) * sizeof(T));                                 \
}                                                                                          \
/* Lane sums of g and g*v (g read as +0 where the bitmap, from storage offset e0, drops). */ \
static void grad_stats_##SUF(const T *x, const T *g, int64_t n, int64_t L, double *s,      \
                             double *d, const uint8_t *bits, int64_t e0) {                 \
    T xpad[LMAX] = {0}, gpad[LMAX] = {0};                                                  \
    int64_t full = n / L * L;                                                              \
    memcpy(xpad, x + full, (size_t)(n - full) * sizeof(T));                                \
    memcpy(gpad, g + full, (size_t)(n - full) * sizeof(T));                                \
    IF_NARROW({                                                                            \
        for (int64_t j = 0; j < L; j += 16) {                                              \
            d4v s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0};\
            for (int64_t i = 0; i <= full; i += L) {                                       \
                const T *gp = i < full ? g + i + j : gpad + j;                             \
                const T *xp = i < full ? x + i + j : xpad + j;                             \
                f8v u = drop8(LOAD8(gp), bits, e0 + i + j);                                \
                f8v v = drop8(LOAD8(gp + 8), bits, e0 + i + j + 8);                        \
                f8v xu = RELU8(LOAD8(xp)), xv = RELU8(LOAD8(xp + 8));                      \
                d4v a = wide_lo(u), b = wide_hi(u), c = wide_lo(v), e = wide_hi(v);        \
                s0 += a; s1 += b; s2 += c; s3 += e;                                        \
                d0 += a * wide_lo(xu); d1 += b * wide_hi(xu);                              \
                d2 += c * wide_lo(xv); d3 += e * wide_hi(xv);                              \
            }                                                                              \
            memcpy(s + j, &s0, 32); memcpy(s + j + 4, &s1, 32);                            \
            memcpy(s + j + 8, &s2, 32); memcpy(s + j + 12, &s3, 32);                       \
            memcpy(d + j, &d0, 32); memcpy(d + j + 4, &d1, 32);                            \
            memcpy(d + j + 8, &d2, 32); memcpy(d + j + 12, &d3, 32);                       \
        }                                                                                  \
        return;                                                                            \
    })                                                                                     \
    for (int64_t j = 0; j < L; j += 16) {                                                  \
        d8v s0 = {0}, s1 = {0}, d0 = {0}, d1 = {0};                                        \
        for (int64_t i = 0; i <= full; i += L) {                                           \
            const T *gp = i < full ? g + i + j : gpad + j;                                 \
            const T *xp = i < full ? x + i + j : xpad + j;                                 \
            d8v a = wide(drop8(LOAD8(gp), bits, e0 + i + j));                              \
            d8v b = wide(drop8(LOAD8(gp + 8), bits, e0 + i + j + 8));                      \
            s0 += a; s1 += b;                                                              \
            d0 += a * wide(RELU8(LOAD8(xp))); d1 += b * wide(RELU8(LOAD8(xp + 8)));        \
        }                                                                                  \
        memcpy(s + j, &s0, 64); memcpy(s + j + 8, &s1, 64);                                \
        memcpy(d + j, &d0, 64); memcpy(d + j + 8, &d1, 64);                                \
    }                                                                                      \
}                                                                                          \
/* dx = g * k1 + (v * k2 + k3) per lane, and 0 where a folded-in ReLU blocked x (g read  \
 * as in grad_stats). */                                                                   \
static void grad_input_##SUF(const T *x, const T *g, T *dx, int64_t n, int64_t L,          \
                             const float *k1, const float *k2, const float *k3,            \
                             const uint8_t *bits, int64_t e0) {                            \
    T xpad[LMAX] = {0}, gpad[LMAX] = {0}, out[LMAX];                                       \
    int64_t full = n / L * L;                                                              \
    memcpy(xpad, x + full, (size_t)(n - full) * sizeof(T));                                \
    memcpy(gpad, g + full, (size_t)(n - full) * sizeof(T));                                \
    IF_NARROW({                                                                            \
        for (int64_t j = 0; j < L; j += 8) {                                               \
            f8v a = load8_f32(k1 + j), b = load8_f32(k2 + j), c = load8_f32(k3 + j);       \
            for (int64_t i = 0; i < full; i += L) {                                        \
                f8v v = LOAD8(x + i + j);                                                  \
                f8v dy = drop8(LOAD8(g + i + j), bits, e0 + i + j);                        \
                STORE8(dx + i + j, GRAD8(v, dy * a + (v * b + c)));                        \
            }                                                                              \
            f8v v = LOAD8(xpad + j);                                                       \
            f8v dy = drop8(LOAD8(gpad + j), bits, e0 + full + j);                          \
            STORE8(out + j, GRAD8(v, dy * a + (v * b + c)));                               \
        }                                                                                  \
        memcpy(dx + full, out, (size_t)(n - full) * sizeof(T));                            \
        return;                                                                            \
    })                                                                                     \
    for (int64_t j = 0; j < L; j += 16) {                                                  \
        f16v a = load_f32(k1 + j), b = load_f32(k2 + j), c = load_f32(k3 + j);             \
        for (int64_t i = 0; i < full; i += L) {                                            \
            f16v v = LOAD(x + i + j);                                                      \
            f16v dy = drop_lanes(LOAD(g + i + j), bits, e0 + i + j);                       \
            STORE(dx + i + j, GRAD(v, dy * a + (v * b + c)));                              \
        }                                                                                  \
        f16v v = LOAD(xpad + j);                                                           \
        f16v dy = drop_lanes(LOAD(gpad + j), bits, e0 + full + j);                         \
        STORE(out + j, GRAD(v, dy * a + (v * b + c)));                                     \
    }                                                                                      \
    memcpy(dx + full, out, (size_t)(n - full) * sizeof(T));                                \
}                                                                                          \
                                                                                           \
/* y zeroed at the dropped units. */                                                       \
static void zero_dropped_##SUF(T *y, const int64_t *drop, int64_t ndrop, int64_t C,       \
                               int64_t HW) {                                               \
    offsets_t t = offsets_start(C, HW);                                                    \
    for (int64_t k = 0; k < ndrop; k++) y[next_offset(&t, drop[k])] = (T)0;                \
}                                                                                          \
/* Training-mode forward: batch statistics; the running statistics updated in place      \
 * (momentum, unbiased variance, as torch does); y = ((v - mean) * invstd * w + b) * scale \
 * (scale: a following dropout's 1 / (1 - p), folded in), then 0 at the ndrop dropped    \
 * units drop (the dropout's mask); save = (mean, invstd) per channel, for the backward.  \
 * Returns -1, having changed nothing, if a dropped unit is out of range; else 0. */       \
int nl_bn_forward_##SUF(const T *x, T *y, int64_t n, int64_t C, int64_t HW, int64_t L,    \
                        const float *w, const float *b, float *running_mean,               \
                        float *running_var, double momentum, double eps, double scale,     \
                        double *save, const int64_t *drop, int64_t ndrop) {                \
    double s[LMAX], q[LMAX], sum[LMAX], sq[LMAX];                                          \
    float a[LMAX], c[LMAX];                                                                \
    const double m = (double)(n / C);                                                      \
    if (check_drop(drop, ndrop, n)) return -1;                                             \
    stats_##SUF(x, n, L, s, q);                                                            \
    fold(s, q, L, C, sum, sq);                                                             \
    for (int64_t k = 0; k < C; k++) {                                                      \
        double mean = sum[k] / m, var = sq[k] / m - mean * mean;                           \
        if (var < 0.0) var = 0.0;                                                          \
        double invstd = 1.0 / sqrt(var + eps);                                             \
        save[k] = mean;                                                                    \
        save[C + k] = invstd;                                                              \
        running_mean[k] = (float)((1.0 - momentum) * running_mean[k] + momentum * mean);   \
        running_var[k] = (float)((1.0 - momentum) * running_var[k]                         \
                                 + momentum * var * m / (m > 1.0 ? m - 1.0 : 1.0));        \
        a[k] = (float)(w[k] * invstd * scale);                                             \
        c[k] = (float)((b[k] - mean * w[k] * invstd) * scale);                             \
    }                                                                                      \
    for (int64_t j = C; j < L; j++) { a[j] = a[j % C]; c[j] = c[j % C]; }                  \
    affine_##SUF(x, y, n, L, a, c);                                                        \
    zero_dropped_##SUF(y, drop, ndrop, C, HW);                                             \
    return 0;                                                                              \
}                                                                                          \
/* Eval-mode forward: y = (v - running_mean) * invstd * w + b, invstd from the running   \
 * variance, in one pass (the per-channel factors computed in double, as the forward's). */ \
void nl_bn_eval_##SUF(const T *x, T *y, int64_t n, int64_t C, int64_t L, const float *w,  \
                      const float *b, const float *running_mean, const float *running_var, \
                      double eps) {                                                        \
    float a[LMAX], c[LMAX];                                                                \
    for (int64_t k = 0; k < C; k++) {                                                      \
        double invstd = 1.0 / sqrt((double)running_var[k] + eps);                          \
        a[k] = (float)(w[k] * invstd);                                                     \
        c[k] = (float)(b[k] - (double)running_mean[k] * w[k] * invstd);                    \
    }                                                                                      \
    for (int64_t j = C; j < L; j++) { a[j] = a[j % C]; c[j] = c[j % C]; }                  \
    affine_##SUF(x, y, n, L, a, c);                                                        \
}                                                                                          \
/* Its backward for the output gradient g (read as 0 at the dropped units): dx, and dw,  \
 * db (written, not added to); bits: scratch of n / 8 + BITMAP_SLACK bytes. Returns -1,   \
 * having written nothing, if a dropped unit is out of range; else 0. */                   \
int nl_bn_backward_##SUF(const T *x, const T *g, T *dx, int64_t n, int64_t C, int64_t HW,  \
                         int64_t L, const float *w, double scale, const double *save,      \
                         float *dw, float *db, const int64_t *drop, int64_t ndrop,         \
                         uint8_t *bits) {                                                  \
    double s[LMAX], d[LMAX], sum_g[LMAX], sum_gv[LMAX];                                    \
    float k1[LMAX], k2[LMAX], k3[LMAX];                                                    \
    const double m = (double)(n / C);                                                      \
    if (check_drop(drop, ndrop, n)) return -1;                                             \
    const uint8_t *dropped = drop_bitmap(drop, ndrop, n, C, HW, bits);                     \
    grad_stats_##SUF(x, g, n, L, s, d, dropped, 0);                                        \
    fold(s, d, L, C, sum_g, sum_gv);                                                       \
    for (int64_t k = 0; k < C; k++) {                                                      \
        double mean = save[k], invstd = save[C + k];                                       \
        double sum_g_xhat = (sum_gv[k] - mean * sum_g[k]) * invstd;                        \
        double A = w[k] * invstd * scale, B = -A * invstd * sum_g_xhat / m;                \
        dw[k] = (float)(sum_g_xhat * scale);                                               \
        db[k] = (float)(sum_g[k] * scale);                                                 \
        k1[k] = (float)A;                                                                  \
        k2[k] = (float)B;                                                                  \
        k3[k] = (float)(-A * sum_g[k] / m - B * mean);                                     \
    }                                                                                      \
    for (int64_t j = C; j < L; j++) { k1[j] = k1[j % C]; k2[j] = k2[j % C]; k3[j] = k3[j % C]; } \
    grad_input_##SUF(x, g, dx, n, L, k1, k2, k3, dropped, 0);                              \
    return 0;                                                                              \
}

/* GroupNorm over one channels-last image at a time: the image is HW*C values, its lane
 * sums fold into channels and the channels into G groups of C/G. */
#define DEFINE_GN(SUF, T)                                                                  \
/* Forward: y = ((v - mean_ng) * invstd_ng * w + b) * scale, then 0 at the dropped units; \
 * save = (mean, invstd) per (image, group), N*G each. Returns -1 (nothing changed) if a  \
 * dropped unit is out of range; else 0. */                                                \
int nl_gn_forward_##SUF(const T *x, T *y, int64_t N, int64_t HW, int64_t C, int64_t G,     \
                        int64_t L, const float *w, const float *b, double eps,             \
                        double scale, double *save, const int64_t *drop, int64_t ndrop) {  \
    double s[LMAX], q[LMAX], sum[LMAX], sq[LMAX];                                          \
    float a[LMAX], c[LMAX];                                                                \
    const int64_t n = HW * C, per = C / G;                                                 \
    const double count = (double)(HW * per);                                               \
    if (check_drop(drop, ndrop, N * n)) return -1;                                         \
    for (int64_t img = 0; img < N; img++) {                                                \
        stats_##SUF(x + img * n, n, L, s, q);                                              \
        fold(s, q, L, C, sum, sq);                                                         \
        for (int64_t g = 0; g < G; g++) {                                                  \
            double gs = 0.0, gq = 0.0;                                                     \
            for (int64_t k = g * per; k < (g + 1) * per; k++) { gs += sum[k]; gq += sq[k]; } \
            double mean = gs / count, var = gq / count - mean * mean;                      \
            if (var < 0.0) var = 0.0;                                                      \
            double invstd = 1.0 / sqrt(var + eps);                                         \
            save[img * G + g] = mean;                                                      \
            save[N * G + img * G + g] = invstd;                                            \
            for (int64_t k = g * per; k < (g + 1) * per; k++) {                            \
                a[k] = (float)(w[k] * invstd * scale);                                     \
                c[k] = (float)((b[k] - mean * w[k] * invstd) * scale);                     \
            }                                                                              \
        }                                                                                  \
        for (int64_t j = C; j < L; j++) { a[j] = a[j % C]; c[j] = c[j % C]; }              \
        affine_##SUF(x + img * n, y + img * n, n, L, a, c);                                \
    }                                                                                      \
    zero_dropped_##SUF(y, drop, ndrop, C, HW);                                             \
    return 0;                                                                              \
}                                                                                          \
/* Backward for the output gradient g (read as 0 at the dropped units): dx, and dw, db    \
 * (written, not added to); bits as nl_bn_backward's. Returns -1 (nothing written) if a   \
 * dropped unit is out of range; else 0. */                                                \
int nl_gn_backward_##SUF(const T *x, const T *g, T *dx, int64_t N, int64_t HW, int64_t C,  \
                         int64_t G, int64_t L, const float *w, double scale,               \
                         const double *save, float *dw, float *db, const int64_t *drop,    \
                         int64_t ndrop, uint8_t *bits) {                                   \
    double s[LMAX], d[LMAX], s1[LMAX], s2[LMAX], dws[LMAX] = {0}, dbs[LMAX] = {0};         \
    float k1[LMAX], k2[LMAX], k3[LMAX];                                                    \
    const int64_t n = HW * C, per = C / G;                                                 \
    const double count = (double)(HW * per);                                               \
    if (check_drop(drop, ndrop, N * n)) return -1;                                         \
    const uint8_t *dropped = drop_bitmap(drop, ndrop, N * n, C, HW, bits);                 \
    for (int64_t img = 0; img < N; img++) {                                                \
        grad_stats_##SUF(x + img * n, g + img * n, n, L, s, d, dropped, img * n);          \
        fold(s, d, L, C, s1, s2);                                                          \
        for (int64_t grp = 0; grp < G; grp++) {                                            \
            double mean = save[img * G + grp], invstd = save[N * G + img * G + grp];       \
            double m1 = 0.0, m2 = 0.0;                                                     \
            for (int64_t k = grp * per; k < (grp + 1) * per; k++) {                       \
                double sum_g_xhat = (s2[k] - mean * s1[k]) * invstd;                       \
                m1 += scale * w[k] * s1[k];                                                \
                m2 += scale * w[k] * sum_g_xhat;                                           \
                dws[k] += scale * sum_g_xhat;                                              \
                dbs[k] += scale * s1[k];                                                   \
            }                                                                              \
            m1 /= count;                                                                   \
            m2 /= count;                                                                   \
            for (int64_t k = grp * per; k < (grp + 1) * per; k++) {                        \
                k1[k] = (float)(invstd * scale * w[k]);                                    \
                k2[k] = (float)(-invstd * invstd * m2);                                    \
                k3[k] = (float)(-invstd * m1 + invstd * invstd * m2 * mean);               \
            }                                                                              \
        }                                                                                  \
        for (int64_t j = C; j < L; j++) { k1[j] = k1[j % C]; k2[j] = k2[j % C]; k3[j] = k3[j % C]; } \
        grad_input_##SUF(x + img * n, g + img * n, dx + img * n, n, L, k1, k2, k3,         \
                         dropped, img * n);                                                \
    }                                                                                      \
    for (int64_t k = 0; k < C; k++) { dw[k] = (float)dws[k]; db[k] = (float)dbs[k]; }      \
    return 0;                                                                              \
}

DEFINE(f32, float, load_f32, store_f32, keep, all_grad, load8_f32, keep8, store8_f32,
       all_grad8)
DEFINE(bf16, uint16_t, load_bf16, store_bf16, keep, all_grad, load8_bf16, keep8,
       store8_bf16_rne, all_grad8)
DEFINE(f32_relu, float, load_f32, store_f32, relu, relu_grad, load8_f32, relu8,
       store8_f32, relu_grad8)
DEFINE(bf16_relu, uint16_t, load_bf16, store_bf16, relu, relu_grad, load8_bf16, relu8,
       store8_bf16_rne, relu_grad8)
DEFINE_GN(f32, float)
DEFINE_GN(bf16, uint16_t)
DEFINE_GN(f32_relu, float)
DEFINE_GN(bf16_relu, uint16_t)

/* 2x2 max pooling, stride 2, of a channels-last (N, C, H, W) tensor, as torch's CPU kernel
 * picks: in each window the first largest value in (h, w) order, except that a NaN takes
 * over (the last NaN); -inf everywhere picks the first. arg gets the pick (0..3) per output
 * value, for the backward; an odd last row or column is left out, as torch does. Branch
 * free, 8 channels at a time: the window's first value stands for torch's -inf start (a
 * -inf or NaN first value ends the same). */
typedef uint8_t b8v __attribute__((vector_size(8)));
static inline void store8_bf16(uint16_t *p, f8v v) {  /* exact for values read from bf16 */
#if defined(__AVX2__) && !defined(__AVX512F__)  /* GCC narrows the generic one lane by lane */
    __m256i h = _mm256_srai_epi32((__m256i)v, 16);  /* in int16 range: packs keeps it */
    _mm_storeu_si128((__m128i *)p, _mm_packs_epi32(_mm256_castsi256_si128(h),
                                                   _mm256_extracti128_si256(h, 1)));
#else
    h8v h = __builtin_convertvector((i8v)v >> 16, h8v);
    memcpy(p, &h, sizeof h);
#endif
}
/* The picks (0..3) as 8 bytes. */
static inline void store8_picks(uint8_t *p, i8v k) {
#if defined(__AVX2__) && !defined(__AVX512F__)  /* as store8_bf16 */
    __m128i w = _mm_packs_epi32(_mm256_castsi256_si128((__m256i)k),
                                _mm256_extracti128_si256((__m256i)k, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packs_epi16(w, w));
#else
    b8v kb = __builtin_convertvector(k, b8v);
    memcpy(p, &kb, sizeof kb);
#endif
}
static inline void pick8(f8v *best, i8v *k, f8v v, int q) {
    i8v take = (v > *best) | (v != v);
    *best = (f8v)(((i8v)v & take) | ((i8v)*best & ~take));
    *k = (*k & ~take) | ((i8v){q, q, q, q, q, q, q, q} & take);
}
#define DEFINE_POOL(SUF, T, TOF, FROMF, LOAD8, STORE8)                                     \
void nl_maxpool2_forward_##SUF(const T *x, T *y, uint8_t *arg, int64_t N, int64_t H,       \
                               int64_t W, int64_t C) {                                     \
    const int64_t OH = H / 2, OW = W / 2;                                                  \
    for (int64_t n = 0; n < N; n++)                                                        \
        for (int64_t oh = 0; oh < OH; oh++)                                                \
            for (int64_t ow = 0; ow < OW; ow++) {                                          \
                const T *a = x + ((n * H + 2 * oh) * W + 2 * ow) * C, *b = a + W * C;     \
                int64_t o = ((n * OH + oh) * OW + ow) * C, c = 0;                          \
                for (; c + 8 <= C; c += 8) {                                               \
                    f8v best = LOAD8(a + c);                                               \
                    i8v k = {0};                                                           \
                    pick8(&best, &k, LOAD8(a + C + c), 1);                                 \
                    pick8(&best, &k, LOAD8(b + c), 2);                                     \
                    pick8(&best, &k, LOAD8(b + C + c), 3);                                 \
                    STORE8(y + o + c, best);                                               \
                    store8_picks(arg + o + c, k);                                          \
                }                                                                          \
                for (; c < C; c++) {                                                       \
                    float v[4] = {TOF(a[c]), TOF(a[C + c]), TOF(b[c]), TOF(b[C + c])};     \
                    float best = v[0];                                                     \
                    uint8_t k = 0;                                                         \
                    for (int q = 1; q < 4; q++)                                            \
                        if (v[q] > best || v[q] != v[q]) { best = v[q]; k = (uint8_t)q; }  \
                    y[o + c] = FROMF(best);                                                \
                    arg[o + c] = k;                                                        \
                }                                                                          \
            }                                                                              \
}                                                                                          \
/* Its backward: dx is g at each window's pick and 0 elsewhere. */                         \
void nl_maxpool2_backward_##SUF(const T *g, const uint8_t *arg, T *dx, int64_t N,          \
                                int64_t H, int64_t W, int64_t C) {                         \
    const int64_t OH = H / 2, OW = W / 2;                                                  \
    const int64_t off[4] = {0, C, W * C, W * C + C};                                       \
    memset(dx, 0, (size_t)(N * H * W * C) * sizeof(T));                                   \
    for (int64_t n = 0; n < N; n++)                                                        \
        for (int64_t oh = 0; oh < OH; oh++)                                                \
            for (int64_t ow = 0; ow < OW; ow++) {                                          \
                T *out = dx + ((n * H + 2 * oh) * W + 2 * ow) * C;                         \
                int64_t o = ((n * OH + oh) * OW + ow) * C;                                 \
                for (int64_t c = 0; c < C; c++) out[off[arg[o + c]] + c] = g[o + c];       \
            }                                                                              \
}

/* bf16 <-> float, exact both ways for a float that came from a bf16 (NaN payloads too). */
static inline float f32_value(float v) { return v; }
static inline float bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}
static inline uint16_t bf16_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return (uint16_t)(u >> 16);
}
DEFINE_POOL(f32, float, f32_value, f32_value, load8_f32, store8_f32)
DEFINE_POOL(bf16, uint16_t, bf16_value, bf16_bits, load8_bf16, store8_bf16)

/* Training inputs (normlab's augment = "normlab"): the uint8 images images[idx[k]] (H x W
 * each, n of them) rotated by degrees[k] about the centre, nearest pixel, 0 (black) outside, then
 * (v / 255 - mean) / std, into out (N x H x W floats). The geometry is torch's affine_grid
 * + grid_sample (align_corners False, nearest, half-way to even) computed in double rather
 * than float32, so a pixel whose source lies within float32 rounding of a half-way point
 * may come from the other neighbour (one pixel in 10 million did, at +-7 degrees); the
 * values are exactly the torch path's (float32 v / 255, minus mean, over std). Returns -1,
 * having written nothing, if an index is outside the n images; else 0. */
int nl_rotate_normalize(const uint8_t *images, int64_t n, const int64_t *idx,
                        const float *degrees, int64_t N, int64_t H, int64_t W, float mean,
                        float std, float *out) {
    const double pi = 3.14159265358979323846;
    for (int64_t k = 0; k < N; k++)
        if (idx[k] < 0 || idx[k] >= n) return -1;
    double xs[ROTATE_MAX], ys[ROTATE_MAX];  /* pixel centres in [-1, 1] */
    for (int64_t j = 0; j < W; j++) xs[j] = (2.0 * (double)j + 1.0) / (double)W - 1.0;
    for (int64_t i = 0; i < H; i++) ys[i] = (2.0 * (double)i + 1.0) / (double)H - 1.0;
    float value[256];
    for (int v = 0; v < 256; v++) value[v] = ((float)v / 255.0f - mean) / std;
    for (int64_t k = 0; k < N; k++) {
        const uint8_t *img = images + idx[k] * H * W;
        float *o = out + k * H * W;
        const double t = (double)degrees[k] * (pi / 180.0), c = cos(t), s = sin(t);
        for (int64_t i = 0; i < H; i++) {
            const double sy = s * ys[i], cy = c * ys[i];
            int64_t j = 0;
#ifdef __AVX512F__  /* 8 pixels at a time: the same operations in the same order per lane */
            const __m512d vc = _mm512_set1_pd(c), vs = _mm512_set1_pd(s);
            const __m512d vsy = _mm512_set1_pd(sy), vcy = _mm512_set1_pd(cy);
            const __m512d one = _mm512_set1_pd(1.0), half = _mm512_set1_pd(0.5);
            const __m512d w = _mm512_set1_pd((double)W), h = _mm512_set1_pd((double)H);
            const __m512d zero = _mm512_setzero_pd();
            for (; j + 8 <= W; j += 8) {
                const __m512d x = _mm512_loadu_pd(xs + j);
                __m512d ix = _mm512_add_pd(_mm512_sub_pd(_mm512_mul_pd(vc, x), vsy), one);
                ix = _mm512_mul_pd(_mm512_sub_pd(_mm512_mul_pd(ix, w), one), half);
                ix = _mm512_roundscale_pd(ix, _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
                __m512d iy = _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(vs, x), vcy), one);
                iy = _mm512_mul_pd(_mm512_sub_pd(_mm512_mul_pd(iy, h), one), half);
                iy = _mm512_roundscale_pd(iy, _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
                const __mmask8 inside = _mm512_cmp_pd_mask(ix, zero, _CMP_GE_OQ)
                                        & _mm512_cmp_pd_mask(ix, w, _CMP_LT_OQ)
                                        & _mm512_cmp_pd_mask(iy, zero, _CMP_GE_OQ)
                                        & _mm512_cmp_pd_mask(iy, h, _CMP_LT_OQ);
                /* outside pixels read pixel 0 (then black): every index read is in range */
                const __m512d at = _mm512_maskz_add_pd(inside, _mm512_mul_pd(iy, w), ix);
                int32_t pix[8];
                _mm256_storeu_si256((__m256i *)pix, _mm512_cvttpd_epi32(at));
                for (int q = 0; q < 8; q++)
                    o[i * W + j + q] = (inside >> q) & 1 ? value[img[pix[q]]] : value[0];
            }
#endif
            for (; j < W; j++) {
                /* source = ((R (x, y) + 1) * size - 1) / 2, to the nearest pixel */
                const double ix = nearbyint(((c * xs[j] - sy + 1.0) * (double)W - 1.0) * 0.5);
                const double iy = nearbyint(((s * xs[j] + cy + 1.0) * (double)H - 1.0) * 0.5);
                const int inside = ix >= 0.0 && ix < (double)W && iy >= 0.0 && iy < (double)H;
                o[i * W + j] = inside ? value[img[(int64_t)iy * W + (int64_t)ix]] : value[0];
            }
        }
    }
    return 0;
}
