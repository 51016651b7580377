/* moerge native kernels: fused per-block loops for the task-vector merge family.
 *
 * Each kernel takes one block of each input in its stored dtype (bfloat16 or
 * float32), works through it in cache-sized chunks (convert to float32,
 * subtract the base, mask, combine, round to the output dtype), and touches each
 * input byte once per pass. The arithmetic is float32, in the same order as the
 * torch path of moerge/methods/task_vector.py; floating-point contraction is off
 * (-ffp-contract=off), so the result never depends on vectorisation, chunk or
 * block size. Every kernel counts the non-finite input values it loaded; emit
 * kernels also count non-finite results before and after rounding.
 *
 * Plain C, called through ctypes (which releases the GIL); the module init at
 * the end only lets setuptools build this file as an extension and Python find it.
 */
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

#define EXPORT __attribute__((visibility("default")))
#define INLINE static inline __attribute__((always_inline)) /* inlined into each target clone */
#define CH 2048 /* elements per chunk: (models + 4) x 8 KiB of float32 scratch */

enum { DT_F32 = 0, DT_BF16 = 1 };
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
enum { MASK_NONE = 0, MASK_THRESHOLD = 1, MASK_WINDOW = 2, MASK_BERNOULLI = 3, MASK_DROP_ALL = 4 };
enum { COMBINE_SUM = 0, COMBINE_CONSENSUS_SUM = 1, COMBINE_CONSENSUS_COUNT = 2 };

INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Load elements [off, off+len) of a block as float32; returns how many are NaN/Inf. */
INLINE int64_t load(float *restrict dst, const void *src, int dt, int64_t off, int64_t len) {
    int32_t nf = 0; /* chunk-local counters are 32-bit: they vectorise without widening */
    if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (int64_t j = 0; j < len; j++) {
            uint32_t u = (uint32_t)s[j] << 16;
            nf += (u & 0x7F800000u) == 0x7F800000u;
            dst[j] = u2f(u);
        }
    } else {
        const float *s = (const float *)src + off;
        for (int64_t j = 0; j < len; j++) {
            float f = s[j];
            nf += (f2u(f) & 0x7F800000u) == 0x7F800000u;
            dst[j] = f;
        }
    }
    return nf;
}

/* Store float32 results rounded to the output dtype (bfloat16: round to nearest even, NaN -> 0x7FC0,
 * as torch does). flags[0] += non-finite results before rounding, flags[1] += after. */
INLINE void store(void *dst, int dt, int64_t off, const float *restrict src, int64_t len, int64_t *flags) {
    int32_t nf_exact = 0, nf_out = 0;
    if (dt == DT_BF16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (int64_t j = 0; j < len; j++) {
            uint32_t u = f2u(src[j]);
            int is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
            uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
            r = is_nan ? 0x7FC0u : r;
            nf_exact += (u & 0x7F800000u) == 0x7F800000u;
            nf_out += (r & 0x7F80u) == 0x7F80u;
            d[j] = (uint16_t)r;
        }
    } else {
        float *d = (float *)dst + off;
        for (int64_t j = 0; j < len; j++) {
            nf_exact += (f2u(src[j]) & 0x7F800000u) == 0x7F800000u;
            d[j] = src[j];
        }
        nf_out = nf_exact;
    }
    flags[0] += nf_exact;
    flags[1] += nf_out;
}

/* Counter-based random keep decisions (DARE): element i of a tensor is kept iff the top 24 bits
 * of h(i) are below t24 = ceil(density * 2^24), where h is two rounds of the lowbias32 integer
 * hash keyed by the 64-bit seed. Any range, in any order, on any device gives the same mask. */
INLINE uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

INLINE int keep_bit(uint32_t lo, uint32_t hi, uint32_t s0, uint32_t s1, uint32_t t24) {
    return (mix32(mix32(lo ^ s0) ^ s1 ^ hi) >> 8) < t24;
}

/* keep[j] = 1.0f or 0.0f for elements off .. off+len-1, in 32-bit arithmetic (vectorises): the high
 * word of the index grows by one where the low word wraps. */
INLINE void keep_mask(float *restrict keep, int64_t off, int64_t len, uint64_t seed, uint32_t t24) {
    uint32_t s0 = (uint32_t)seed, s1 = (uint32_t)(seed >> 32);
    uint32_t lo0 = (uint32_t)off, hi0 = (uint32_t)((uint64_t)off >> 32);
    for (int64_t j = 0; j < len; j++) {
        uint32_t lo = lo0 + (uint32_t)j;
        keep[j] = keep_bit(lo, hi0 + (lo < lo0), s0, s1, t24) ? 1.0f : 0.0f;
    }
}

/* Keep decisions as bits (bit t of byte g is element 8g+t), so a second pass need not hash again. */
INLINE void pack_bits(uint8_t *restrict bits, const float *restrict keep, int64_t len) {
    int64_t g = 0;
    for (; 8 * g + 8 <= len; g++) {
        uint32_t v = 0;
        for (int t = 0; t < 8; t++) v |= (uint32_t)(keep[8 * g + t] != 0.0f) << t;
        bits[g] = (uint8_t)v;
    }
    if (8 * g < len) {
        uint32_t v = 0;
        for (int t = 0; 8 * g + t < len; t++) v |= (uint32_t)(keep[8 * g + t] != 0.0f) << t;
        bits[g] = (uint8_t)v;
    }
}

INLINE void unpack_bits(float *restrict keep, const uint8_t *restrict bits, int64_t len) {
    const v8i shift = {0, 1, 2, 3, 4, 5, 6, 7};
    int64_t g = 0;
    for (; 8 * g + 8 <= len; g++) { /* one byte to eight 0/1 floats: broadcast, shift, mask, convert */
        v8i v = (v8i){0} + (int32_t)bits[g];
        v8f f = __builtin_convertvector((v >> shift) & 1, v8f);
        memcpy(keep + 8 * g, &f, sizeof f);
    }
    for (int64_t j = 8 * g; j < len; j++) keep[j] = (float)((bits[j >> 3] >> (j & 7)) & 1u);
}

MULTIVERSION EXPORT void mk_bernoulli(int64_t start, int64_t n, uint64_t seed, uint32_t t24, uint8_t *out) {
    float keep[CH];
    for (int64_t c = 0; c < n; c += CH) {
        int64_t len = n - c < CH ? n - c : CH;
        keep_mask(keep, start + c, len, seed, t24);
        for (int64_t j = 0; j < len; j++) out[c + j] = keep[j] != 0.0f;
    }
}

/* The seeded stream itself, top 24 bits of each element's hash (DELLA compares it with a threshold per
 * element): the C twin of ``masks.uniform24_range``. */
MULTIVERSION EXPORT void mk_uniform24(int64_t start, int64_t n, uint64_t seed, int32_t *out) {
    uint32_t s0 = (uint32_t)seed, s1 = (uint32_t)(seed >> 32);
    for (int64_t c = 0; c < n; c += CH) {
        int64_t len = n - c < CH ? n - c : CH, off = start + c;
        uint32_t lo0 = (uint32_t)off, hi0 = (uint32_t)((uint64_t)off >> 32);
        for (int64_t j = 0; j < len; j++) {
            uint32_t lo = lo0 + (uint32_t)j;
            out[c + j] = (int32_t)(mix32(mix32(lo ^ s0) ^ s1 ^ (hi0 + (lo < lo0))) >> 8);
        }
    }
}

/* |model - base| as float32 bits, for a chunk. */
INLINE int64_t abs_delta_bits(uint32_t *restrict bits, float *restrict tmp, const void *base, int dtb,
                              const void *model, int dtm, int64_t off, int64_t len) {
    int64_t nf = load(tmp, model, dtm, off, len);
    if (base != NULL) {
        float b[CH];
        nf += load(b, base, dtb, off, len);
        for (int64_t j = 0; j < len; j++) tmp[j] -= b[j];
    }
    for (int64_t j = 0; j < len; j++) bits[j] = f2u(tmp[j]) & 0x7FFFFFFFu;
    return nf;
}

/* Radix selection, pass 0: histogram of the high 15 bits of |model - base| (base may be NULL).
 * Branch-free; four interleaved counter sets so that runs of equal values do not serialise on one
 * counter, and chunks that are mostly exact zeros (sparse task vectors) count those apart. */
MULTIVERSION EXPORT int64_t mk_hist_hi(const void *base, int dtb, const void *model, int dtm, int64_t n,
                                       int64_t *hist) {
    uint32_t bits[CH];
    float tmp[CH];
    uint32_t *h = calloc(4 << 15, sizeof(uint32_t));
    int64_t nf = 0, zeros = 0;
    if (h == NULL) return -1;
    for (int64_t c = 0; c < n; c += CH) {
        int64_t len = n - c < CH ? n - c : CH;
        nf += abs_delta_bits(bits, tmp, base, dtb, model, dtm, c, len);
        int32_t z = 0;
        for (int64_t j = 0; j < len; j++) z += bits[j] == 0;
        int64_t m = len;
        if (z > len / 4) { /* mostly exact zeros (sparse task vectors): count them, scatter the rest */
            zeros += z;
            m = 0;
            for (int64_t j = 0; j < len; j++) {
                bits[m] = bits[j];
                m += bits[j] != 0;
            }
        }
        int64_t j = 0;
        for (; j + 3 < m; j += 4) {
            h[bits[j] >> 16]++;
            h[(1 << 15) + (bits[j + 1] >> 16)]++;
            h[(2 << 15) + (bits[j + 2] >> 16)]++;
            h[(3 << 15) + (bits[j + 3] >> 16)]++;
        }
        for (; j < m; j++) h[bits[j] >> 16]++;
    }
    hist[0] += zeros;
    for (int i = 0; i < 1 << 15; i++)
        hist[i] += (int64_t)h[i] + h[(1 << 15) + i] + h[(2 << 15) + i] + h[(3 << 15) + i];
    free(h);
    return nf;
}

/* Radix selection, pass 1: for each of nb high-bit bins, histogram of the low 16 bits of the
 * elements in that bin (hists: nb x 65536). The members of a bin are first gathered without
 * branches, then counted; exact zeros are counted apart. */
MULTIVERSION EXPORT int64_t mk_hist_lo(const void *base, int dtb, const void *model, int dtm, int64_t n, int nb,
                                       const int32_t *bins, int64_t *hists) {
    uint32_t bits[CH];
    uint16_t low[CH];
    float tmp[CH];
    int64_t nf = 0;
    for (int64_t c = 0; c < n; c += CH) {
        int64_t len = n - c < CH ? n - c : CH;
        nf += abs_delta_bits(bits, tmp, base, dtb, model, dtm, c, len);
        for (int k = 0; k < nb; k++) {
            uint32_t want = (uint32_t)bins[k];
            int64_t *h = hists + (int64_t)k * 65536;
            int32_t cnt = 0, zeros = 0;
            if (want == 0) { /* exact zeros (sparse task vectors) are counted apart */
                for (int64_t j = 0; j < len; j++) zeros += bits[j] == 0;
                h[0] += zeros;
            }
            int32_t members = 0;
            for (int64_t j = 0; j < len; j++) members += ((bits[j] >> 16) == want) & (bits[j] != 0);
            if (members == 0) continue;
            for (int64_t j = 0; j < len; j++) {
                low[cnt] = (uint16_t)bits[j];
                cnt += ((bits[j] >> 16) == want) & (bits[j] != 0);
            }
            for (int32_t j = 0; j < cnt; j++) h[low[j]]++;
        }
    }
    return nf;
}

/* Sampled-bracket selection, one pass: for each of nb brackets [lo[k], hi[k]] of |model − base| bit
 * patterns, counts[4k..4k+3] += (elements above hi, equal to hi, equal to lo, strictly inside), and
 * the strictly inside ones are appended to out[k] (room for cap + 1). Bit patterns equal to a bound
 * are only counted: bf16 task vectors hold long runs of equal magnitudes, which need no sorting.
 * Past cap nothing more is stored but counting goes on, so the caller sees an overflow. When a
 * sample put the wanted rank inside the bracket, this one pass replaces both radix passes. */
MULTIVERSION EXPORT int64_t mk_bracket(const void *base, int dtb, const void *model, int dtm, int64_t n, int nb,
                                       const uint32_t *lo, const uint32_t *hi, int64_t *counts,
                                       uint32_t *const *out, int64_t cap) {
    uint32_t bits[CH];
    float tmp[CH];
    int64_t nf = 0;
    for (int64_t c = 0; c < n; c += CH) {
        int64_t len = n - c < CH ? n - c : CH;
        nf += abs_delta_bits(bits, tmp, base, dtb, model, dtm, c, len);
        for (int k = 0; k < nb; k++) {
            const uint32_t l = lo[k], h = hi[k];
            int32_t above = 0, at_hi = 0, at_lo = 0, m = 0;
            for (int64_t j = 0; j < len; j++) {
                above += bits[j] > h;
                at_hi += bits[j] == h;
                at_lo += bits[j] == l;
                m += (bits[j] > l) & (bits[j] < h);
            }
            int64_t *cnt = counts + 4 * k;
            cnt[0] += above;
            cnt[1] += at_hi;
            cnt[2] += at_lo;
            if (m == 0) continue;
            int64_t got = cnt[3];
            if (got + m <= cap) { /* branch-free gather: every element is written, members advance */
                uint32_t *o = out[k];
                for (int64_t j = 0; j < len; j++) {
                    o[got] = bits[j];
                    got += (bits[j] > l) & (bits[j] < h);
                }
            } else {
                got += m;
            }
            cnt[3] = got;
        }
    }
    return nf;
}

/* DARE's L1 rescale statistics: sums[0] += sum |d|, sums[1] += sum |d| over kept entries
 * (double precision, in four interleaved partial sums). With ``bits``, the keep decisions of the block
 * are stored there too (ceil(n/8) bytes), for mk_tv_emit. */
MULTIVERSION EXPORT int64_t mk_dare_l1(const void *base, int dtb, const void *model, int dtm, int64_t n,
                                       int64_t start, uint64_t seed, uint32_t t24, double *sums, uint8_t *bits) {
    uint32_t abits[CH];
    float tmp[CH], keep[CH];
    int64_t nf = 0;
    v4d all = {0, 0, 0, 0}, kept = {0, 0, 0, 0};
    double all_tail = 0.0, kept_tail = 0.0;
    for (int64_t c = 0; c < n; c += CH) {
        int64_t len = n - c < CH ? n - c : CH;
        nf += abs_delta_bits(abits, tmp, base, dtb, model, dtm, c, len);
        keep_mask(keep, start + c, len, seed, t24);
        if (bits != NULL) pack_bits(bits + c / 8, keep, len); /* c is a multiple of CH, so of 8 */
        for (int64_t j = 0; j < len; j++) tmp[j] = u2f(abits[j]);
        int64_t j = 0;
        for (; j + 4 <= len; j += 4) {
            v4f x, k;
            memcpy(&x, tmp + j, sizeof x);
            memcpy(&k, keep + j, sizeof k);
            all += __builtin_convertvector(x, v4d);
            kept += __builtin_convertvector(x * k, v4d);
        }
        for (; j < len; j++) {
            all_tail += (double)tmp[j];
            kept_tail += (double)(tmp[j] * keep[j]);
        }
    }
    sums[0] += all[0] + all[1] + all[2] + all[3] + all_tail;
    sums[1] += kept[0] + kept[1] + kept[2] + kept[3] + kept_tail;
    return nf;
}

/* Per-model description of a task vector's sparsifier and its part in the combination.
 * Layout shared with moerge/native/__init__.py (TV_FIELDS). */
typedef struct {
    int64_t mask;       /* MASK_* */
    int64_t has_lo, cut_lo, seen_lo; /* window: lower rank boundary (value lo), state in/out */
    int64_t has_hi, cut_hi, seen_hi; /* window: upper rank boundary (value hi), state in/out */
    int64_t seed;       /* bernoulli */
    int64_t t24;        /* bernoulli */
    double weight;      /* w_i */
    double scale;       /* rescale of kept entries (DARE) */
    double vote_weight; /* factor of d_i in the summed vote */
    double sign;        /* factor of sign(d_i) in the counted vote and in the agreement test */
    double div_weight;  /* what an agreeing model adds to the divisor */
    double lo;          /* threshold (MASK_THRESHOLD) or lower boundary value (MASK_WINDOW) */
    double hi;          /* upper boundary value (MASK_WINDOW) */
    const uint8_t *keep_bits; /* bernoulli: this block's keep bits from mk_dare_l1, or NULL (hash again) */
} tv_model;

/* Window mask on one chunk, in order: rank ties at a boundary value are broken by position
 * (the first cut_lo elements equal to ``lo`` fall below the window, the first cut_hi equal to ``hi``
 * are inside it, counting those of earlier chunks and blocks in seen_lo / seen_hi). Only the chunk
 * where a boundary's count crosses its cut needs an element-by-element loop. */
INLINE void window_mask(float *restrict d, const float *restrict a, int64_t len, tv_model *m) {
    float lo = m->has_lo ? (float)m->lo : -1.0f, hi = m->has_hi ? (float)m->hi : INFINITY;
    int64_t cut_lo = m->has_lo ? m->cut_lo : 0, cut_hi = m->has_hi ? m->cut_hi : INT64_MAX / 4;
    int32_t eq_lo = 0, eq_hi = 0;
    for (int64_t j = 0; j < len; j++) {
        eq_lo += a[j] == lo;
        eq_hi += a[j] == hi;
    }
    int64_t s_lo = m->seen_lo, s_hi = m->seen_hi;
    int mixed_lo = eq_lo && s_lo < cut_lo && s_lo + eq_lo > cut_lo;
    int mixed_hi = eq_hi && s_hi < cut_hi && s_hi + eq_hi > cut_hi;
    if (!mixed_lo && !mixed_hi) {
        int keep_lo = s_lo >= cut_lo;  /* ties at lo: all above the cut already, or all below */
        int keep_hi = s_hi + eq_hi <= cut_hi;
        for (int64_t j = 0; j < len; j++) {
            int ok_lo = a[j] > lo || (a[j] == lo && keep_lo);
            int ok_hi = a[j] < hi || (a[j] == hi && keep_hi);
            d[j] = ok_lo && ok_hi ? d[j] : 0.0f;
        }
    } else {
        for (int64_t j = 0; j < len; j++) {
            int at_lo = a[j] == lo, at_hi = a[j] == hi;
            int ok_lo = at_lo ? ++s_lo > cut_lo : a[j] > lo;
            int ok_hi = at_hi ? ++s_hi <= cut_hi : a[j] < hi;
            d[j] = ok_lo && ok_hi ? d[j] : 0.0f;
        }
    }
    m->seen_lo += eq_lo;
    m->seen_hi += eq_hi;
}

/* Sparsify one model's task vector d (= model - base) of a chunk in place: mask, then rescale.
 * ``a`` is scratch for the magnitudes; ``off`` the chunk's first element index in the tensor, ``rel`` in the
 * block. */
INLINE void sparsify(float *restrict d, float *restrict a, int64_t off, int64_t rel, int64_t len, tv_model *m) {
    if (m->mask == MASK_THRESHOLD) {
        float t = (float)m->lo;
        for (int64_t j = 0; j < len; j++) d[j] = fabsf(d[j]) >= t ? d[j] : 0.0f;
    } else if (m->mask == MASK_WINDOW) {
        for (int64_t j = 0; j < len; j++) a[j] = fabsf(d[j]);
        window_mask(d, a, len, m);
    } else if (m->mask == MASK_DROP_ALL) {
        for (int64_t j = 0; j < len; j++) d[j] = 0.0f;
    } else if (m->mask == MASK_BERNOULLI) {
        if (m->keep_bits != NULL)
            unpack_bits(a, m->keep_bits + rel / 8, len);
        else
            keep_mask(a, off, len, (uint64_t)m->seed, (uint32_t)m->t24);
        for (int64_t j = 0; j < len; j++) d[j] = a[j] != 0.0f ? d[j] : 0.0f;
    }
    if (m->scale != 1.0) {
        float s = (float)m->scale;
        for (int64_t j = 0; j < len; j++) d[j] *= s;
    }
}

INLINE float signf(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }

/* theta_0 + lam * combine(sparsified task vectors), for one block.
 *   combine = COMBINE_SUM: sum_i w_i d_i, divided by ``divide``;
 *   COMBINE_CONSENSUS_*: elect a sign per entry (summed vote_weight*d_i, or summed sign*sign(d_i)),
 *   exact ties elect ``tie``; sum w_i d_i over agreeing models, divided (``normalize``) by the summed
 *   div_weight of the agreeing models (0 counts as 1).
 * With out == NULL, nothing is written and *sign_sum += sum of the elected signs before tie-breaking
 * (the "majority" statistics pass). flags[0], flags[1]: non-finite results before/after rounding.
 * Returns the number of non-finite inputs loaded. */
MULTIVERSION EXPORT int64_t mk_tv_emit(const void *base, int dtb, const void *const *models, const int32_t *dtm,
                                       int k, tv_model *mp, int64_t n, int64_t start, int combine, float lam,
                                       float divide, int normalize, float tie, void *out, int dto,
                                       int64_t *flags, double *sign_sum) {
    float *buf = malloc(sizeof(float) * CH * (size_t)(k + 4));
    if (buf == NULL) return -1;
    float *b = buf, *acc = buf + CH, *den = buf + 2 * CH, *a = buf + 3 * CH, *d0 = buf + 4 * CH;
    int64_t nf = 0, signs = 0;
    for (int64_t c = 0; c < n; c += CH) {
        int64_t len = n - c < CH ? n - c : CH;
        nf += load(b, base, dtb, c, len);
        for (int i = 0; i < k; i++) {
            float *d = d0 + (int64_t)i * CH;
            nf += load(d, models[i], dtm[i], c, len);
            for (int64_t j = 0; j < len; j++) d[j] -= b[j];
            sparsify(d, a, start + c, c, len, &mp[i]);
        }
        if (combine == COMBINE_SUM) {
            for (int64_t j = 0; j < len; j++) acc[j] = 0.0f;
            for (int i = 0; i < k; i++) {
                const float *d = d0 + (int64_t)i * CH;
                float w = (float)mp[i].weight;
                for (int64_t j = 0; j < len; j++) acc[j] += w * d[j];
            }
            if (divide != 1.0f)
                for (int64_t j = 0; j < len; j++) acc[j] /= divide;
        } else {
            /* the vote goes in acc, the elected sign in a */
            for (int64_t j = 0; j < len; j++) acc[j] = 0.0f;
            for (int i = 0; i < k; i++) {
                const float *d = d0 + (int64_t)i * CH;
                if (combine == COMBINE_CONSENSUS_SUM) {
                    float vw = (float)mp[i].vote_weight;
                    for (int64_t j = 0; j < len; j++) acc[j] += vw * d[j];
                } else {
                    float s = (float)mp[i].sign;
                    for (int64_t j = 0; j < len; j++) acc[j] += s * signf(d[j]);
                }
            }
            if (out == NULL) {
                int32_t sg = 0;
                for (int64_t j = 0; j < len; j++) sg += (acc[j] > 0.0f) - (acc[j] < 0.0f);
                signs += sg;
                continue;
            }
            for (int64_t j = 0; j < len; j++) {
                float e = signf(acc[j]);
                a[j] = e == 0.0f ? tie : e;
                acc[j] = 0.0f;
                den[j] = 0.0f;
            }
            for (int i = 0; i < k; i++) {
                const float *d = d0 + (int64_t)i * CH;
                float w = (float)mp[i].weight, s = (float)mp[i].sign, dw = (float)mp[i].div_weight;
                for (int64_t j = 0; j < len; j++) {
                    int agree = s * signf(d[j]) == a[j];
                    acc[j] += w * (agree ? d[j] : 0.0f);
                    den[j] += agree ? dw : 0.0f;
                }
            }
            if (normalize)
                for (int64_t j = 0; j < len; j++) acc[j] /= den[j] == 0.0f ? 1.0f : den[j];
        }
        for (int64_t j = 0; j < len; j++) acc[j] = b[j] + lam * acc[j];
        store(out, dto, c, acc, len, flags);
    }
    if (sign_sum != NULL) *sign_sum += (double)signs;
    free(buf);
    return nf;
}

/* Weighted sum of the models, divided by ``divide`` (linear merge / model soup). */
MULTIVERSION EXPORT int64_t mk_linear_emit(const void *const *models, const int32_t *dtm, int k,
                                           const float *w, int64_t n, float divide, void *out, int dto,
                                           int64_t *flags) {
    float m[CH], acc[CH];
    int64_t nf = 0;
    for (int64_t c = 0; c < n; c += CH) {
        int64_t len = n - c < CH ? n - c : CH;
        for (int64_t j = 0; j < len; j++) acc[j] = 0.0f;
        for (int i = 0; i < k; i++) {
            nf += load(m, models[i], dtm[i], c, len);
            for (int64_t j = 0; j < len; j++) acc[j] += w[i] * m[j];
        }
        if (divide != 1.0f)
            for (int64_t j = 0; j < len; j++) acc[j] /= divide;
        store(out, dto, c, acc, len, flags);
    }
    return nf;
}

/* Gram matrix of the (task) vectors of one block, accumulated in double: out[i*k + j] += Σ dᵢ·dⱼ
   for i ≤ j, with dᵢ = modelᵢ − base (or modelᵢ when base is NULL). For SLERP (norms and the dot
   product of two models) and Model Stock (norms and pairwise dots of the task vectors). */
MULTIVERSION EXPORT int64_t mk_gram(const void *base, int dtb, const void *const *models, const int32_t *dtm,
                                    int k, int64_t n, double *out) {
    float b[CH], d[8][CH];
    int64_t nf = 0;
    for (int64_t c = 0; c < n; c += CH) {
        int64_t len = n - c < CH ? n - c : CH;
        if (base) nf += load(b, base, dtb, c, len);
        for (int i = 0; i < k; i++) {
            nf += load(d[i], models[i], dtm[i], c, len);
            if (base)
                for (int64_t j = 0; j < len; j++) d[i][j] -= b[j];
        }
        for (int i = 0; i < k; i++)
            for (int l = i; l < k; l++) {
                double acc0 = 0.0, acc1 = 0.0, acc2 = 0.0, acc3 = 0.0;
                int64_t j = 0;
                for (; j + 4 <= len; j += 4) {
                    acc0 += (double)d[i][j] * (double)d[l][j];
                    acc1 += (double)d[i][j + 1] * (double)d[l][j + 1];
                    acc2 += (double)d[i][j + 2] * (double)d[l][j + 2];
                    acc3 += (double)d[i][j + 3] * (double)d[l][j + 3];
                }
                for (; j < len; j++) acc0 += (double)d[i][j] * (double)d[l][j];
                out[i * k + l] += (acc0 + acc1) + (acc2 + acc3);
            }
    }
    return nf;
}

/* A bus error (SIGBUS) is what touching a mapped page past the end of a file that shrank after it was
 * mapped gives (or an I/O error under a mapping). Python cannot handle it: its handler would return to
 * the faulting instruction forever. While moerge maps inputs, this handler writes the message it was
 * given (async-signal-safe write) and ends the process with 128 + SIGBUS, as the signal would, instead of
 * a bare "Bus error". The output is published atomically, so nothing torn is left. */
#ifndef _WIN32
#include <signal.h>
#include <unistd.h>
#define BUS_NOTES 4096
#define BUS_PATH 512
static char bus_msg[1024];
static size_t bus_len;
static struct sigaction bus_before;
/* The mappings made while guarded, newest last (a ring): the handler names the file of the faulting
 * address. An address reused by a later mapping is found in the newer note first. */
static struct {
    volatile uintptr_t start, end;
    char path[BUS_PATH];
} bus_notes[BUS_NOTES];
static int64_t bus_count;

static void say(const char *s, size_t n) {
    ssize_t r = write(2, s, n);
    (void)r;
}

static void on_bus(int sig, siginfo_t *info, void *ctx) {
    (void)ctx;
    uintptr_t at = (uintptr_t)info->si_addr;
    const char *path = "an input file";
    int64_t n = __atomic_load_n(&bus_count, __ATOMIC_ACQUIRE);
    for (int64_t k = n - 1; k >= 0 && k >= n - BUS_NOTES; k--) {
        int i = (int)(k % BUS_NOTES);
        if (bus_notes[i].start <= at && at < bus_notes[i].end) {
            path = bus_notes[i].path;
            break;
        }
    }
    say("error: ", 7);
    say(path, strlen(path));
    say(": ", 2);
    say(bus_msg, bus_len);
    _exit(128 + sig);
}

EXPORT int mk_bus_guard(const char *msg) {
    size_t n = strlen(msg);
    if (n > sizeof bus_msg) n = sizeof bus_msg;
    memcpy(bus_msg, msg, n);
    bus_len = n;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_bus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, &bus_before);
}

EXPORT int mk_bus_unguard(void) { return sigaction(SIGBUS, &bus_before, NULL); }

EXPORT void mk_bus_note(uintptr_t start, uint64_t len, const char *path) {
    int64_t k = __atomic_fetch_add(&bus_count, 1, __ATOMIC_ACQ_REL);
    int i = (int)(k % BUS_NOTES);
    __atomic_store_n(&bus_notes[i].end, 0, __ATOMIC_RELEASE); /* no range matches while the path changes */
    __atomic_store_n(&bus_notes[i].start, 0, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    size_t n = strlen(path);
    if (n >= BUS_PATH) n = BUS_PATH - 1;
    memcpy(bus_notes[i].path, path, n);
    bus_notes[i].path[n] = 0;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&bus_notes[i].start, start, __ATOMIC_RELEASE);
    __atomic_store_n(&bus_notes[i].end, start + len, __ATOMIC_RELEASE);
}
#else
EXPORT int mk_bus_guard(const char *msg) { (void)msg; return -1; }
EXPORT int mk_bus_unguard(void) { return -1; }
EXPORT void mk_bus_note(uintptr_t start, uint64_t len, const char *path) { (void)start; (void)len; (void)path; }
#endif

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "moerge native kernels (loaded through ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
