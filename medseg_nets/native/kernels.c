/* Copyright (c) medseg-bundles contributors
 * Licensed under the Apache License, Version 2.0
 *
 * Fused float32 CPU kernels for inference on channels-first (N, C, spatial...) maps, used through ctypes by
 * medseg_nets.native (compiled on first use with the system C compiler; see that module). Each kernel splits its
 * work over (sample, channel) planes across `threads` POSIX threads. Statistics are accumulated in double.
 *
 * - mn_depthwise3d: depth-wise k x k x k convolution, stride 1, 'same' zero padding dil * (k / 2), read and
 *   written channels-first (no layout copies); optionally the per-plane sum and sum of squares of its output.
 * - mn_norm_act: per-plane normalisation (instance norm, or group norm with one group per channel), optional
 *   per-channel affine, then PReLU (one or per-channel slope), of x or of x + r, in one read for the statistics
 *   (skipped when they are given) and one read-write pass; in place when y == x.
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

/* ---------------------------------------------------------------- depth-wise convolution */

typedef struct {
    const float *x;      /* (n, c, D, H, W) contiguous */
    const float *wt;     /* (c, 1, k, k, k) contiguous */
    const float *b;      /* (c) or NULL */
    float *y;            /* plane (s, ch) at y + s * y_sample_stride + ch * D*H*W */
    double *stats;       /* (s, ch) -> stats[(s * stats_sample_stride + ch) * 2 + {0, 1}] or NULL */
    int64_t c, d, h, w, y_sample_stride, stats_sample_stride;
    int k, dil;
} mn_dw_ctx;

/* One output vector (or two, `two`) at the window base `p`: bias + the k^3 taps, one partial sum per kernel plane
 * kd (independent dependency chains), planes whose input slice lies outside the volume skipped. */
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

/* Input slices are copied, once each, into a ring of zero-padded slices (pad = dil * (k / 2) along H and W, rows
 * rounded up to whole vectors) that stays in cache; every output vector is then bias + the weighted input vectors
 * at fixed offsets, without bounds tests. */
static void mn_dw_task(const void *vctx, int64_t begin, int64_t end) {
    const mn_dw_ctx *ctx = (const mn_dw_ctx *)vctx;
    const int64_t D = ctx->d, H = ctx->h, W = ctx->w, plane = D * H * W;
    const int k = ctx->k, kk = k * k * k, dil = ctx->dil;
    const int64_t pad = (int64_t)dil * (k / 2);
    const int64_t Wr = (W + MN_VEC - 1) / MN_VEC * MN_VEC; /* outputs per row, rounded up */
    const int64_t Wp = Wr + 2 * pad, Hp = H + 2 * pad, slice = Hp * Wp;
    const int64_t R = 2 * pad + 1; /* ring: input slices od - pad .. od + pad */
    float *ring = (float *)calloc((size_t)(R * slice), sizeof(float));
    float *row = (float *)malloc(sizeof(float) * (size_t)Wr);
    int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (size_t)(k * k));
    const float **slices = (const float **)malloc(sizeof(float *) * (size_t)k);
    int64_t item;
    int t;
    if (ring == NULL || row == NULL || off == NULL || slices == NULL) goto done;
    for (t = 0; t < k * k; ++t) off[t] = (int64_t)(t / k) * dil * Wp + (int64_t)(t % k) * dil;
    for (item = begin; item < end; ++item) {
        const int64_t s = item / ctx->c, ch = item % ctx->c;
        const float *restrict xin = ctx->x + item * plane;
        const float *restrict wk = ctx->wt + ch * (int64_t)kk;
        float *restrict yout = ctx->y + s * ctx->y_sample_stride + ch * plane;
        const float bias = ctx->b ? ctx->b[ch] : 0.0f;
        double st[2] = {0.0, 0.0};
        float shift = 0.0f;
        int64_t od, oh, i, loaded = -1; /* input slices < loaded+1 are in the ring */
        for (od = 0; od < D; ++od) {
            int kd;
            mn_vec sa = (mn_vec){0}, sq = (mn_vec){0}; /* this slice's shifted sums, full vectors of the rows */
            double tail[2] = {0.0, 0.0};                /* and the rows' last W % MN_VEC values */
            for (; loaded < od + pad && loaded + 1 < D; ++loaded) {
                float *dst = ring + ((loaded + 1) % R) * slice;
                int64_t ih;
                for (ih = 0; ih < H; ++ih)
                    memcpy(dst + (ih + pad) * Wp + pad, xin + ((loaded + 1) * H + ih) * W, sizeof(float) * (size_t)W);
            }
            for (kd = 0; kd < k; ++kd) {
                const int64_t id = od + (int64_t)(kd - k / 2) * dil;
                slices[kd] = (id < 0 || id >= D) ? NULL : ring + (id % R) * slice;
            }
            for (oh = 0; oh < H; ++oh) {
                const int64_t base = oh * Wp; /* window of output (oh, i): rows oh.. of each padded slice, column i */
                const float *shifted[16];
                int kd2;
                for (kd2 = 0; kd2 < k && kd2 < 16; ++kd2) shifted[kd2] = slices[kd2] ? slices[kd2] + base : NULL;
                for (i = 0; i + 2 * MN_VEC <= Wr; i += 2 * MN_VEC) mn_dw_vectors(shifted, off, wk, k, bias, i, 1, row + i);
                if (i < Wr) mn_dw_vectors(shifted, off, wk, k, bias, i, 0, row + i);
                memcpy(yout + (od * H + oh) * W, row, sizeof(float) * (size_t)W);
                if (ctx->stats) {
                    int64_t j;
                    if (od == 0 && oh == 0) shift = row[0];
                    for (j = 0; j + MN_VEC <= W; j += MN_VEC) {
                        const mn_vec v = mn_load(row + j) - shift;
                        sa += v;
                        sq += v * v;
                    }
                    for (; j < W; ++j) {
                        const double v = (double)(row[j] - shift);
                        tail[0] += v;
                        tail[1] += v * v;
                    }
                }
            }
            if (ctx->stats) {
                int l;
                for (l = 0; l < MN_VEC; ++l) {
                    st[0] += sa[l];
                    st[1] += sq[l];
                }
                st[0] += tail[0];
                st[1] += tail[1];
            }
        }
        if (ctx->stats) {
            double *out = ctx->stats + (s * ctx->stats_sample_stride + ch) * 2;
            mn_unshift(st, (double)shift, plane);
            out[0] = st[0];
            out[1] = st[1];
        }
    }
done:
    free(ring);
    free(row);
    free(off);
    free((void *)slices);
}

int mn_depthwise3d(const float *x, const float *w, const float *b, float *y, double *stats, int64_t n, int64_t c,
                   int64_t d, int64_t h, int64_t wd, int k, int dil, int64_t y_sample_stride,
                   int64_t stats_sample_stride, int threads) {
    mn_dw_ctx ctx;
    ctx.x = x;
    ctx.wt = w;
    ctx.b = b;
    ctx.y = y;
    ctx.stats = stats;
    ctx.c = c;
    ctx.d = d;
    ctx.h = h;
    ctx.w = wd;
    ctx.k = k;
    ctx.dil = dil;
    ctx.y_sample_stride = y_sample_stride;
    ctx.stats_sample_stride = stats_sample_stride;
    return mn_parallel_for(n * c, threads, mn_dw_task, &ctx);
}

/* ---------------------------------------------------------------- normalisation + PReLU */

typedef struct {
    const float *x, *r;  /* (n, c, S) contiguous; r optional (added to x first) */
    float *y;            /* (n, c, S), may be x */
    const double *stats; /* (n, c, 2) sums and sums of squares of x (+ r), or NULL: computed */
    const float *gamma, *beta, *alpha; /* (c) or NULL; alpha: PReLU slope(s), alpha_len 1 or c, NULL: none */
    int64_t c, S, alpha_len;
    double eps;
} mn_na_ctx;

static void mn_na_task(const void *vctx, int64_t begin, int64_t end) {
    const mn_na_ctx *ctx = (const mn_na_ctx *)vctx;
    const int64_t S = ctx->S;
    int64_t item, i;
    for (item = begin; item < end; ++item) {
        const int64_t ch = item % ctx->c;
        const float *restrict x = ctx->x + item * S;
        const float *restrict r = ctx->r ? ctx->r + item * S : NULL;
        float *y = ctx->y + item * S; /* may alias x */
        double sum, sumsq, mean, var;
        float scale, shift, a;
        if (ctx->stats) {
            sum = ctx->stats[item * 2];
            sumsq = ctx->stats[item * 2 + 1];
        } else {
            double st2[2] = {0.0, 0.0};
            const float shift = S > 0 ? x[0] + (r ? r[0] : 0.0f) : 0.0f;
            mn_sums(x, r, S, shift, st2);
            mn_unshift(st2, (double)shift, S);
            sum = st2[0];
            sumsq = st2[1];
        }
        mean = sum / (double)S;
        var = sumsq / (double)S - mean * mean;
        if (var < 0.0) var = 0.0;
        {
            const double rstd = 1.0 / sqrt(var + ctx->eps);
            const double g = ctx->gamma ? (double)ctx->gamma[ch] : 1.0;
            const double bt = ctx->beta ? (double)ctx->beta[ch] : 0.0;
            scale = (float)(rstd * g);
            shift = (float)(bt - mean * rstd * g);
        }
        if (ctx->alpha) {
            a = ctx->alpha[ctx->alpha_len == 1 ? 0 : ch];
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
        } else {
            if (r) {
                for (i = 0; i < S; ++i) y[i] = (x[i] + r[i]) * scale + shift;
            } else {
                for (i = 0; i < S; ++i) y[i] = x[i] * scale + shift;
            }
        }
    }
}

int mn_norm_act(const float *x, const float *r, float *y, const double *stats, const float *gamma, const float *beta,
                const float *alpha, int64_t alpha_len, int64_t n, int64_t c, int64_t S, double eps, int threads) {
    mn_na_ctx ctx;
    ctx.x = x;
    ctx.r = r;
    ctx.y = y;
    ctx.stats = stats;
    ctx.gamma = gamma;
    ctx.beta = beta;
    ctx.alpha = alpha;
    ctx.alpha_len = alpha_len;
    ctx.c = c;
    ctx.S = S;
    ctx.eps = eps;
    return mn_parallel_for(n * c, threads, mn_na_task, &ctx);
}
