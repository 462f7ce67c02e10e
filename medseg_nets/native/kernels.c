/* Copyright (c) medseg-bundles contributors
 * Licensed under the Apache License, Version 2.0
 *
 * Fused float32 CPU kernels for inference on channels-first (N, C, spatial...) maps, used through ctypes by
 * medseg_nets.native (compiled on first use with the system C compiler; see that module). Each kernel splits its
 * work over (sample, channel) planes across `threads` POSIX threads. Statistics are sums about a shift (the
 * plane's first value), in float lanes over short blocks, added up in double.
 *
 * - mn_depthwise3d: depth-wise k x k x k convolution (1 to 8 branches of the same input, each with its weights
 *   and dilation), stride 1, 'same' zero padding dil * (k / 2), read and written channels-first (no layout
 *   copies), the input read once; optionally each output plane's normalisation + affine + PReLU applied in place
 *   while it is in cache.
 * - mn_norm_act: per-plane normalisation (instance norm, or group norm with one group per channel), optional
 *   per-channel affine, then PReLU (one or per-channel slope), of x or of x + r, in one read for the statistics
 *   and one read-write pass; in place when y == x.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*mn_task)(const void *ctx, int64_t begin, int64_t end);

typedef struct {
    mn_task fn;
    const void *ctx;
    int64_t begin, end;
} mn_job;

static void *mn_run_job(void *p) {
    const mn_job *j = (const mn_job *)p;
    j->fn(j->ctx, j->begin, j->end);
    return NULL;
}

/* fn(ctx, begin, end) over [0, n) split into `threads` contiguous ranges, the first run by the caller. */
static int mn_parallel_for(int64_t n, int threads, mn_task fn, const void *ctx) {
    enum { MAX_THREADS = 256 };
    pthread_t tid[MAX_THREADS];
    mn_job jobs[MAX_THREADS];
    int started[MAX_THREADS];
    int t, rc = 0;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = (int)n;
    if (threads <= 1) {
        if (n > 0) fn(ctx, 0, n);
        return 0;
    }
    for (t = 0; t < threads; ++t) {
        jobs[t].fn = fn;
        jobs[t].ctx = ctx;
        jobs[t].begin = n * t / threads;
        jobs[t].end = n * (t + 1) / threads;
        started[t] = 0;
    }
    for (t = 1; t < threads; ++t) started[t] = pthread_create(&tid[t], NULL, mn_run_job, &jobs[t]) == 0;
    mn_run_job(&jobs[0]);
    for (t = 1; t < threads; ++t) {
        if (started[t])
            pthread_join(tid[t], NULL);
        else
            mn_run_job(&jobs[t]); /* no thread: run it here */
    }
    return rc;
}

#define MN_VEC 16 /* outputs in one vector (one 512-bit or two 256-bit registers) */
typedef float mn_vec __attribute__((vector_size(MN_VEC * sizeof(float)), aligned(sizeof(float))));

static inline mn_vec mn_load(const float *p) {
    mn_vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Sum and sum of squares of (x[0:S] (+ r[0:S]) - shift), added into s[0], s[1]: vector lanes over blocks of
 * MN_BLOCK values (no one sum reassociated), each block's lanes flushed into double. Subtracting a value close to
 * the data (its first element) keeps the variance E[v^2] - E[v]^2 free of cancellation. */
#define MN_BLOCK (MN_VEC * 64)
static void mn_sums(const float *restrict x, const float *restrict r, int64_t S, float shift, double *s) {
    double s1 = 0.0, s2 = 0.0;
    int64_t i = 0;
    int l;
    while (i + MN_VEC <= S) {
        mn_vec a = (mn_vec){0}, q = (mn_vec){0};
        const int64_t stop = i + MN_BLOCK < S ? i + MN_BLOCK : S;
        if (r) {
            for (; i + MN_VEC <= stop; i += MN_VEC) {
                const mn_vec v = mn_load(x + i) + mn_load(r + i) - shift;
                a += v;
                q += v * v;
            }
        } else {
            for (; i + MN_VEC <= stop; i += MN_VEC) {
                const mn_vec v = mn_load(x + i) - shift;
                a += v;
                q += v * v;
            }
        }
        for (l = 0; l < MN_VEC; ++l) {
            s1 += a[l];
            s2 += q[l];
        }
    }
    for (; i < S; ++i) {
        const double v = (double)((r ? x[i] + r[i] : x[i]) - shift);
        s1 += v;
        s2 += v * v;
    }
    s[0] += s1;
    s[1] += s2;
}

/* Shifted sums (about `shift`, S values) -> plain sum and sum of squares, in double. */
static void mn_unshift(double *s, double shift, int64_t S) {
    const double sum = s[0], sumsq = s[1];
    s[0] = sum + (double)S * shift;
    s[1] = sumsq + 2.0 * shift * sum + (double)S * shift * shift;
}

/* Per-channel normalisation as an affine map: from the sums s[0], s[1] of S values, the biased variance and eps,
 * scale = gamma[ch] / sqrt(var + eps) and shift = beta[ch] - mean * scale (gamma / beta NULL: 1 / 0). */
static void mn_affine_from_sums(const double *s, int64_t S, double eps, const float *gamma, const float *beta,
                                int64_t ch, float *scale, float *shift) {
    const double mean = s[0] / (double)S;
    double var = s[1] / (double)S - mean * mean;
    double rstd, g, bt;
    if (var < 0.0) var = 0.0;
    rstd = 1.0 / sqrt(var + eps);
    g = gamma ? (double)gamma[ch] : 1.0;
    bt = beta ? (double)beta[ch] : 0.0;
    *scale = (float)(rstd * g);
    *shift = (float)(bt - mean * rstd * g);
}

/* y = PReLU((x (+ r)) * scale + shift) over S values, slope *alpha (alpha NULL: no PReLU); y may be x. */
static void mn_affine_prelu(const float *x, const float *restrict r, float *y, int64_t S, float scale, float shift,
                            const float *alpha) {
    const float a = alpha ? *alpha : 1.0f;
    int64_t i;
    if (r) {
        for (i = 0; i < S; ++i) {
            const float v = (x[i] + r[i]) * scale + shift;
            y[i] = v > 0.0f ? v : a * v;
        }
    } else {
        for (i = 0; i < S; ++i) {
            const float v = x[i] * scale + shift;
            y[i] = v > 0.0f ? v : a * v;
        }
    }
}

/* ---------------------------------------------------------------- depth-wise convolution */

#define MN_MAX_BRANCHES 8

typedef struct {
    const float *x;                      /* (n, c, D, H, W) contiguous */
    const float *wt[MN_MAX_BRANCHES];    /* per branch (c, 1, k, k, k) contiguous */
    const float *b[MN_MAX_BRANCHES];     /* per branch (c) or NULL */
    int dil[MN_MAX_BRANCHES];
    int nb;                              /* branches: same input, kernel size; own weights and dilation */
    float *y;                            /* (n, nb * c, D, H, W) contiguous: branch bi at channels bi * c .. */
    int64_t c, d, h, w;
    int k;
    /* optional, per branch: each finished output plane normalised (its own mean and biased variance, eps), with
     * the affine gn_w / gn_b (NULL: 1 / 0), then PReLU with slopes act[bi] (act_len[bi] 1 or c; NULL: none), in
     * place while it is still in cache */
    int post;
    const float *gn_w[MN_MAX_BRANCHES], *gn_b[MN_MAX_BRANCHES], *act[MN_MAX_BRANCHES];
    int64_t act_len[MN_MAX_BRANCHES];
    double eps;
} mn_dw_ctx;

/* One output vector (or two, `two`) at the window base `p` (any k): bias + the k^3 taps, one partial sum per kernel
 * plane kd (independent dependency chains), planes whose input slice lies outside the volume skipped. */
static inline void mn_dw_vectors(const float *const *slices, const int64_t *off, const float *restrict wk, int k,
                                 float bias, int64_t i, int two, float *restrict out) {
    mn_vec acc0 = (mn_vec){0} + bias, acc1 = (mn_vec){0} + bias;
    int kd, t;
    const int kk2 = k * k;
    for (kd = 0; kd < k; ++kd) {
        const float *restrict sl = slices[kd];
        mn_vec p0 = (mn_vec){0}, p1 = (mn_vec){0};
        if (sl == NULL) continue;
        sl += i;
        if (two) {
            for (t = 0; t < kk2; ++t) {
                const float wv = wk[kd * kk2 + t];
                p0 += wv * mn_load(sl + off[t]);
                p1 += wv * mn_load(sl + off[t] + MN_VEC);
            }
        } else {
            for (t = 0; t < kk2; ++t) p0 += wk[kd * kk2 + t] * mn_load(sl + off[t]);
        }
        acc0 += p0;
        acc1 += p1;
    }
    memcpy(out, &acc0, sizeof acc0);
    if (two) memcpy(out + MN_VEC, &acc1, sizeof acc1);
}

/* One output row of NV vectors for k = 3: bias + the 27 taps, each weight broadcast once for the row, the NV
 * accumulators in registers. `rows[kd]`: the padded slice of kernel plane kd at this output's window (NULL: outside
 * the volume); `ld`: padded row length. */
#define MN_DW_ROW(NV)                                                                                              \
    static inline void mn_dw_row3_##NV(const float *const *rows, int64_t ld, int dil, const float *restrict wk,    \
                                       float bias, float *restrict out) {                                         \
        mn_vec acc[NV];                                                                                           \
        int v, kd, kh;                                                                                            \
        for (v = 0; v < NV; ++v) acc[v] = (mn_vec){0} + bias;                                                     \
        for (kd = 0; kd < 3; ++kd) {                                                                              \
            if (rows[kd] == NULL) continue;                                                                       \
            for (kh = 0; kh < 3; ++kh) {                                                                          \
                const float *restrict r = rows[kd] + (int64_t)kh * dil * ld;                                      \
                const float w0 = wk[(kd * 3 + kh) * 3], w1 = wk[(kd * 3 + kh) * 3 + 1],                           \
                            w2 = wk[(kd * 3 + kh) * 3 + 2];                                                       \
                for (v = 0; v < NV; ++v)                                                                          \
                    acc[v] += w0 * mn_load(r + v * MN_VEC) + w1 * mn_load(r + v * MN_VEC + dil) +                 \
                              w2 * mn_load(r + v * MN_VEC + 2 * dil);                                             \
            }                                                                                                     \
        }                                                                                                         \
        for (v = 0; v < NV; ++v) memcpy(out + v * MN_VEC, &acc[v], sizeof(mn_vec));                               \
    }
MN_DW_ROW(1)
MN_DW_ROW(2)
MN_DW_ROW(3)
MN_DW_ROW(4)
MN_DW_ROW(5)
MN_DW_ROW(6)

static inline void mn_dw_row3(const float *const *rows, int64_t ld, int dil, const float *wk, float bias, int nv,
                              float *out) {
    switch (nv) {
        case 1: mn_dw_row3_1(rows, ld, dil, wk, bias, out); break;
        case 2: mn_dw_row3_2(rows, ld, dil, wk, bias, out); break;
        case 3: mn_dw_row3_3(rows, ld, dil, wk, bias, out); break;
        case 4: mn_dw_row3_4(rows, ld, dil, wk, bias, out); break;
        case 5: mn_dw_row3_5(rows, ld, dil, wk, bias, out); break;
        default: mn_dw_row3_6(rows, ld, dil, wk, bias, out); break;
    }
}

/* Input slices are copied, once each, into a ring of zero-padded slices (pad = the largest dilation * (k / 2) along
 * H and W, rows rounded up to whole vectors) that stays in cache; every branch reads its taps from that ring, so the
 * input is read from memory once for all branches, and every output vector is bias + the weighted input vectors at
 * fixed offsets, without bounds tests. */
static void mn_dw_task(const void *vctx, int64_t begin, int64_t end) {
    const mn_dw_ctx *ctx = (const mn_dw_ctx *)vctx;
    const int64_t D = ctx->d, H = ctx->h, W = ctx->w, plane = D * H * W;
    const int k = ctx->k, kk = k * k * k, nb = ctx->nb;
    int64_t pad = 0;
    int bi;
    for (bi = 0; bi < nb; ++bi)
        if ((int64_t)ctx->dil[bi] * (k / 2) > pad) pad = (int64_t)ctx->dil[bi] * (k / 2);
    {
        const int64_t Wr = (W + MN_VEC - 1) / MN_VEC * MN_VEC; /* outputs per row, rounded up */
        const int64_t Wp = Wr + 2 * pad, Hp = H + 2 * pad, slice = Hp * Wp;
        const int64_t R = 2 * pad + 1; /* ring: input slices od - pad .. od + pad */
        float *ring = (float *)calloc((size_t)(R * slice), sizeof(float));
        float *row = (float *)malloc(sizeof(float) * (size_t)Wr);
        int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (size_t)(k * k) * (size_t)nb);
        const float **slices = (const float **)malloc(sizeof(float *) * (size_t)k);
        const float **shifted = (const float **)malloc(sizeof(float *) * (size_t)k);
        int64_t item;
        int t;
        if (ring == NULL || row == NULL || off == NULL || slices == NULL || shifted == NULL) goto done;
        for (bi = 0; bi < nb; ++bi)
            for (t = 0; t < k * k; ++t)
                off[bi * k * k + t] = (int64_t)(t / k) * ctx->dil[bi] * Wp + (int64_t)(t % k) * ctx->dil[bi];
        for (item = begin; item < end; ++item) {
            const int64_t s = item / ctx->c, ch = item % ctx->c;
            const float *restrict xin = ctx->x + item * plane;
            double st[MN_MAX_BRANCHES][2];
            float shift[MN_MAX_BRANCHES];
            int64_t od, oh, i, loaded = -1; /* input slices <= loaded are in the ring */
            memset(st, 0, sizeof st);
            memset(shift, 0, sizeof shift);
            for (od = 0; od < D; ++od) {
                for (; loaded < od + pad && loaded + 1 < D; ++loaded) {
                    float *dst = ring + ((loaded + 1) % R) * slice;
                    int64_t ih;
                    for (ih = 0; ih < H; ++ih)
                        memcpy(dst + (ih + pad) * Wp + pad, xin + ((loaded + 1) * H + ih) * W,
                               sizeof(float) * (size_t)W);
                }
                for (bi = 0; bi < nb; ++bi) {
                    const int dil = ctx->dil[bi];
                    const int64_t rb = (int64_t)dil * (k / 2), corner = (pad - rb) * Wp + (pad - rb);
                    const float *restrict wk = ctx->wt[bi] + ch * (int64_t)kk;
                    const float bias = ctx->b[bi] ? ctx->b[bi][ch] : 0.0f;
                    float *restrict yout = ctx->y + ((s * nb + bi) * ctx->c + ch) * plane;
                    mn_vec sa = (mn_vec){0}, sq = (mn_vec){0}; /* this slice's shifted sums, full vectors */
                    double tail[2] = {0.0, 0.0};                /* and the rows' last W % MN_VEC values */
                    int kd;
                    for (kd = 0; kd < k; ++kd) {
                        const int64_t id = od + (int64_t)(kd - k / 2) * dil;
                        slices[kd] = (id < 0 || id >= D) ? NULL : ring + (id % R) * slice + corner;
                    }
                    for (oh = 0; oh < H; ++oh) {
                        for (kd = 0; kd < k; ++kd) shifted[kd] = slices[kd] ? slices[kd] + oh * Wp : NULL;
                        if (k == 3) {
                            for (i = 0; i < Wr; i += 6 * MN_VEC) {
                                const float *rows3[3];
                                const int nv = (int)((Wr - i) / MN_VEC < 6 ? (Wr - i) / MN_VEC : 6);
                                for (kd = 0; kd < 3; ++kd) rows3[kd] = shifted[kd] ? shifted[kd] + i : NULL;
                                mn_dw_row3(rows3, Wp, dil, wk, bias, nv, row + i);
                            }
                        } else {
                            const int64_t *offb = off + bi * k * k;
                            for (i = 0; i + 2 * MN_VEC <= Wr; i += 2 * MN_VEC)
                                mn_dw_vectors(shifted, offb, wk, k, bias, i, 1, row + i);
                            if (i < Wr) mn_dw_vectors(shifted, offb, wk, k, bias, i, 0, row + i);
                        }
                        memcpy(yout + (od * H + oh) * W, row, sizeof(float) * (size_t)W);
                        if (ctx->post) {
                            int64_t j;
                            if (od == 0 && oh == 0) shift[bi] = row[0];
                            for (j = 0; j + MN_VEC <= W; j += MN_VEC) {
                                const mn_vec v = mn_load(row + j) - shift[bi];
                                sa += v;
                                sq += v * v;
                            }
                            for (; j < W; ++j) {
                                const double v = (double)(row[j] - shift[bi]);
                                tail[0] += v;
                                tail[1] += v * v;
                            }
                        }
                    }
                    if (ctx->post) {
                        int l;
                        for (l = 0; l < MN_VEC; ++l) {
                            st[bi][0] += sa[l];
                            st[bi][1] += sq[l];
                        }
                        st[bi][0] += tail[0];
                        st[bi][1] += tail[1];
                    }
                }
            }
            for (bi = 0; bi < nb && ctx->post; ++bi) {
                float *restrict yp = ctx->y + ((s * nb + bi) * ctx->c + ch) * plane;
                float sc, sh;
                mn_unshift(st[bi], (double)shift[bi], plane);
                mn_affine_from_sums(st[bi], plane, ctx->eps, ctx->gn_w[bi], ctx->gn_b[bi], ch, &sc, &sh);
                mn_affine_prelu(yp, NULL, yp, plane, sc, sh,
                                ctx->act[bi] ? ctx->act[bi] + (ctx->act_len[bi] == 1 ? 0 : ch) : NULL);
            }
        }
    done:
        free(ring);
        free(row);
        free(off);
        free((void *)slices);
        free((void *)shifted);
    }
}

/* nb branches (nb <= MN_MAX_BRANCHES) of depth-wise convolution of the same input: weights w[bi], biases b[bi]
 * (NULL entries: no bias), dilations dil[bi]; branch bi's output channels start at channel bi * c of y. With
 * post != 0, each output plane is then normalised, gn_w / gn_b applied and PReLU act[bi] (see mn_dw_ctx). */
int mn_depthwise3d(const float *x, const float *const *w, const float *const *b, const int *dil, int nb, float *y,
                   int64_t n, int64_t c, int64_t d, int64_t h, int64_t wd, int k, int post, const float *const *gn_w,
                   const float *const *gn_b, const float *const *act, const int64_t *act_len, double eps,
                   int threads) {
    mn_dw_ctx ctx = {.x = x, .nb = nb, .y = y, .c = c, .d = d, .h = h, .w = wd, .k = k, .post = post, .eps = eps};
    int bi;
    if (nb < 1 || nb > MN_MAX_BRANCHES || k < 1 || k % 2 == 0 || k > 15) return -1;
    for (bi = 0; bi < nb; ++bi) {
        ctx.wt[bi] = w[bi];
        ctx.b[bi] = b[bi];
        ctx.dil[bi] = dil[bi];
        if (post) {
            ctx.gn_w[bi] = gn_w[bi];
            ctx.gn_b[bi] = gn_b[bi];
            ctx.act[bi] = act[bi];
            ctx.act_len[bi] = act_len[bi];
        }
    }
    return mn_parallel_for(n * c, threads, mn_dw_task, &ctx);
}

/* ---------------------------------------------------------------- normalisation + PReLU */

typedef struct {
    const float *x, *r;  /* (n, c, S) contiguous; r optional (added to x first) */
    float *y;            /* (n, c, S), may be x */
    const float *gamma, *beta, *alpha; /* (c) or NULL; alpha: PReLU slope(s), alpha_len 1 or c, NULL: none */
    int64_t c, S, alpha_len;
    double eps;
} mn_na_ctx;

static void mn_na_task(const void *vctx, int64_t begin, int64_t end) {
    const mn_na_ctx *ctx = (const mn_na_ctx *)vctx;
    const int64_t S = ctx->S;
    int64_t item;
    for (item = begin; item < end; ++item) {
        const int64_t ch = item % ctx->c;
        const float *x = ctx->x + item * S; /* may alias y */
        const float *r = ctx->r ? ctx->r + item * S : NULL;
        const float shift = S > 0 ? x[0] + (r ? r[0] : 0.0f) : 0.0f;
        double st[2] = {0.0, 0.0};
        float sc, sh;
        mn_sums(x, r, S, shift, st);
        mn_unshift(st, (double)shift, S);
        mn_affine_from_sums(st, S, ctx->eps, ctx->gamma, ctx->beta, ch, &sc, &sh);
        mn_affine_prelu(x, r, ctx->y + item * S, S, sc, sh,
                        ctx->alpha ? ctx->alpha + (ctx->alpha_len == 1 ? 0 : ch) : NULL);
    }
}

int mn_norm_act(const float *x, const float *r, float *y, const float *gamma, const float *beta, const float *alpha,
                int64_t alpha_len, int64_t n, int64_t c, int64_t S, double eps, int threads) {
    const mn_na_ctx ctx = {.x = x, .r = r, .y = y, .gamma = gamma, .beta = beta, .alpha = alpha, .c = c, .S = S,
                           .alpha_len = alpha_len, .eps = eps};
    return mn_parallel_for(n * c, threads, mn_na_task, &ctx);
}
