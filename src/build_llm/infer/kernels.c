/* The decoding kernels of build_llm.infer.kernels (see its docstring): matvec_bf16, matvec_int8 and
 * decode_step, called through ctypes. Shipped as package data; compiled once per machine into the
 * user's cache, under a name that carries a hash of this text, so that an edit here is rebuilt. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* y[m, n] = sum_k x[m, k] * W[n, k] (* scale[n]) (+ bias[n]) for m < M, n < N. W is packed (see `pack`):
   tiles of 4 rows x 32 columns, row-major within a tile, the tiles of 4 rows one after another along
   k, so that the kernel reads it front to back. Each input row meets a block of 4 rows while those
   are in the L1 cache; blocks are shared among `threads` OpenMP threads when the matrix is large
   enough to pay for waking them. */
#define PARALLEL_MIN (1 << 18)
/* Both kernels ask for the weights PREFETCH ahead of the ones they multiply (into L1): one core alone cannot
   keep enough reads in flight to use the memory's bandwidth. Measured over gpt2-small's 49 products on the
   development machine (2 cores): bfloat16 23-25 ms -> 18 ms, int8 15 ms -> 10 ms a token. */
#define PREFETCH 4096
#define FETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#define STORE(v, m, x_scale)                                                                          \
    for (int64_t r = 0; r < 4 && n0 + r < N; r++)                                                      \
        y[(m) * N + n0 + r] = v[r] * (x_scale) * (scale ? scale[n0 + r] : 1.0f) + (bias ? bias[n0 + r] : 0.0f);

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* bfloat16: a 64-byte tile row holds 32 weights as 16 pairs; bfloat16 is the top half of a float32, so
   the even weights become floats by moving them to the top half of their pair (a byte shuffle) and the
   odd ones by clearing the bottom half; they multiply x's even and odd entries (split once per call).
   `bf16_rows` gives dot[i][r] = x row i . weight row r of one block, for MR input rows at once: each tile
   is widened once for all MR rows (MR = 4 for a batch, 1 for a lone row, so that a lone row does no
   extra work); with a constant MR the compiler keeps the 4 x MR accumulators in registers. */
static inline __attribute__((always_inline)) void bf16_rows(const int MR, const uint16_t *wb, const float *xe,
                                                            const float *xo, int64_t H, int64_t Kp, float dot[4][4]) {
    /* each 32-bit lane's bytes [b0 b1 b2 b3] -> [0 0 b0 b1]; shuffle indices count within 16 bytes, 0x80 = zero */
    const __m512i to_top = _mm512_broadcast_i32x4(_mm_setr_epi32(0x01008080, 0x05048080, 0x09088080, 0x0D0C8080));
    const __m512i odd_mask = _mm512_set1_epi32((int)0xFFFF0000);
    __m512 acc[4][4];
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < Kp; k += 32) {
        const uint16_t *t = wb + k * 4;  /* 4 rows x 32 columns, 4 cache lines */
        FETCH(t + PREFETCH); FETCH(t + PREFETCH + 32); FETCH(t + PREFETCH + 64); FETCH(t + PREFETCH + 96);
        __m512 we[4], wo[4];
        for (int r = 0; r < 4; r++) {
            const __m512i v = _mm512_loadu_si512(t + 32 * r);
            we[r] = _mm512_castsi512_ps(_mm512_shuffle_epi8(v, to_top));
            wo[r] = _mm512_castsi512_ps(_mm512_and_si512(v, odd_mask));
        }
        for (int i = 0; i < MR; i++) {
            const __m512 ev = _mm512_loadu_ps(xe + i * H + k / 2), ov = _mm512_loadu_ps(xo + i * H + k / 2);
            for (int r = 0; r < 4; r++) acc[i][r] = _mm512_fmadd_ps(ov, wo[r], _mm512_fmadd_ps(ev, we[r], acc[i][r]));
        }
    }
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < 4; r++) dot[i][r] = hsum(acc[i][r]);
}

void matvec_bf16(const float *x, const uint16_t *w, const float *scale, const float *bias, float *y,
                 int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t Kp = (K + 31) / 32 * 32, H = Kp / 2;
    float *xe = calloc(2 * M * H, sizeof(float)), *xo = xe + M * H;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) (k % 2 ? xo : xe)[m * H + k / 2] = x[m * K + k];
    const int64_t blocks = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(N * K >= PARALLEL_MIN ? threads : 1)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n0 = blk * 4;
        const uint16_t *wb = w + blk * 4 * Kp;
        for (int64_t m = 0; m < M;) {
            float dot[4][4];
            const int mr = M - m >= 4 ? 4 : 1;
            if (mr == 4) bf16_rows(4, wb, xe + m * H, xo + m * H, H, Kp, dot);
            else bf16_rows(1, wb, xe + m * H, xo + m * H, H, Kp, dot);
            for (int i = 0; i < mr; i++) { STORE(dot[i], m + i, 1.0f) }
            m += mr;
        }
    }
    free(xe);
}

/* int8: x is rounded to int16 with a scale per row (x * (32767 / max |x|), saturated: 15 significant bits), and the
   products are summed exactly in int32 (`vpmaddwd`: 32 products per instruction, added in pairs), over
   at most 4096 columns at a time so that no sum can overflow (4096 * 32767 * 127 < 2^31 * 2), then
   converted to float32. `int8_rows` is `bf16_rows` for int8: each tile sign-extended once for MR rows. */
#define INT8_CHUNK 4096
static inline __attribute__((always_inline)) void int8_rows(const int MR, const int8_t *wb, const int16_t *xq,
                                                            int64_t Kp, float dot[4][4]) {
    __m512 acc[4][4];
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < Kp; k0 += INT8_CHUNK) {
        const int64_t k1 = k0 + INT8_CHUNK < Kp ? k0 + INT8_CHUNK : Kp;
        __m512i sum[4][4];
        for (int i = 0; i < MR; i++)
            for (int r = 0; r < 4; r++) sum[i][r] = _mm512_setzero_si512();
        for (int64_t k = k0; k < k1; k += 32) {
            const int8_t *t = wb + k * 4;  /* 4 rows x 32 columns, 2 cache lines */
            FETCH(t + PREFETCH); FETCH(t + PREFETCH + 64);
            __m512i wv[4];
            for (int r = 0; r < 4; r++) wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(t + 32 * r)));
            for (int i = 0; i < MR; i++) {
                const __m512i xv = _mm512_loadu_si512(xq + i * Kp + k);
                for (int r = 0; r < 4; r++) sum[i][r] = _mm512_add_epi32(sum[i][r], _mm512_madd_epi16(xv, wv[r]));
            }
        }
        for (int i = 0; i < MR; i++)
            for (int r = 0; r < 4; r++) acc[i][r] = _mm512_add_ps(acc[i][r], _mm512_cvtepi32_ps(sum[i][r]));
    }
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < 4; r++) dot[i][r] = hsum(acc[i][r]);
}

void matvec_int8(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                 int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t Kp = (K + 31) / 32 * 32;
    int16_t *xq = calloc(M * Kp, sizeof(int16_t));
    float *xs = calloc(M, sizeof(float));
    for (int64_t m = 0; m < M; m++) {  /* 16 at a time; the rounding is to nearest, ties to even */
        const float *xm = x + m * K;
        __m512 amax = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 in = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(in, xm + k)));
        }
        const float top = _mm512_reduce_max_ps(amax);
        xs[m] = top > 0.0f ? top / 32767.0f : 1.0f;
        const __m512 inv = _mm512_set1_ps(1.0f / xs[m]);
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 in = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, xm + k), inv));
            _mm256_mask_storeu_epi16(xq + m * Kp + k, in, _mm512_cvtsepi32_epi16(q));
        }
    }
    const int64_t blocks = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(N * K >= PARALLEL_MIN ? threads : 1)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n0 = blk * 4;
        const int8_t *wb = w + blk * 4 * Kp;
        for (int64_t m = 0; m < M;) {
            float dot[4][4];
            const int mr = M - m >= 4 ? 4 : 1;
            if (mr == 4) int8_rows(4, wb, xq + m * Kp, Kp, dot);
            else int8_rows(1, wb, xq + m * Kp, Kp, dot);
            for (int i = 0; i < mr; i++) { STORE(dot[i], m + i, xs[m + i]) }
            m += mr;
        }
    }
    free(xq);
    free(xs);
}

/* ---- One decoding step of a GPT-2-style model: every block, the final norm and the head in one call ----
   M rows (sequences), each adding one token at its own position; keys and values go into the caller's KV
   cache (float32, (layers, rows, heads, max_len, head_dim) with the given layer and row strides). The
   Linear layers are packed bfloat16 (scale NULL) or int8 weights; everything else is float32, computed as
   PyTorch's modules compute it (pre-norm LayerNorm, GELU, softmax attention scaled by 1/sqrt(head_dim)). */
typedef struct { const void *w; const float *scale, *bias; int64_t n, k; } Lin;
typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;  /* ln*_b NULL: no shift */
    Lin qkv[3]; int64_t n_qkv;                   /* one (3C, C) product (q, k, v), or three (C, C) ones */
    Lin att_out, fc, ff_out;
} Block;
typedef struct {
    int64_t n_layers, emb_dim, n_heads, head_dim, hidden, vocab, gelu_tanh;
    float eps;
    const float *tok_emb, *pos_emb, *lnf_w, *lnf_b;
    Lin head;
    const Block *blocks;
} Model;

static void linear(const Lin *l, const float *x, float *y, int64_t M, int threads) {
    if (l->scale) matvec_int8(x, l->w, l->scale, l->bias, y, M, l->n, l->k, threads);
    else matvec_bf16(x, l->w, NULL, l->bias, y, M, l->n, l->k, threads);
}

static void layer_norm(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t C, float eps) {
    for (int64_t m = 0; m < M; m++, x += C, y += C) {
        double mean = 0.0, var = 0.0;
        for (int64_t c = 0; c < C; c++) mean += x[c];
        mean /= C;
        for (int64_t c = 0; c < C; c++) var += (x[c] - mean) * (x[c] - mean);
        const float inv = (float)(1.0 / sqrt(var / C + eps));
        for (int64_t c = 0; c < C; c++) y[c] = (float)(x[c] - mean) * inv * w[c] + (b ? b[c] : 0.0f);
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 in = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(in, a + i), _mm512_maskz_loadu_ps(in, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* y += a * x over n floats */
static inline void axpy(float a, const float *x, float *y, int64_t n) {
    const __m512 av = _mm512_set1_ps(a);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 in = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, in, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(in, x + i), _mm512_maskz_loadu_ps(in, y + i)));
    }
}

/* Returns 0, or 1 when a token id is outside the vocabulary, 2 when a position is outside the cache or the
   position table (nothing is written then). */
int decode_step(const Model *md, const int64_t *ids, const int64_t *pos, int64_t M, float *k_cache, float *v_cache,
                int64_t layer_stride, int64_t row_stride, int64_t max_len, int64_t n_positions, float *logits,
                int threads) {
    const int64_t C = md->emb_dim, H = md->n_heads, D = md->head_dim, F = md->hidden;
    for (int64_t m = 0; m < M; m++) {
        if (ids[m] < 0 || ids[m] >= md->vocab) return 1;
        if (pos[m] < 0 || pos[m] >= max_len || pos[m] >= n_positions) return 2;
    }
    const float att_scale = 1.0f / sqrtf((float)D);
    int64_t longest = 0;
    for (int64_t m = 0; m < M; m++) longest = pos[m] + 1 > longest ? pos[m] + 1 : longest;
    float *x = malloc(sizeof(float) * M * C), *h = malloc(sizeof(float) * M * C), *ctx = malloc(sizeof(float) * M * C);
    float *qkv = malloc(sizeof(float) * M * 3 * C), *part = malloc(sizeof(float) * M * C);
    float *ff = malloc(sizeof(float) * M * F), *scores = malloc(sizeof(float) * M * H * longest);
    for (int64_t m = 0; m < M; m++)  /* token + position embeddings */
        for (int64_t c = 0; c < C; c++) x[m * C + c] = md->tok_emb[ids[m] * C + c] + md->pos_emb[pos[m] * C + c];

    for (int64_t l = 0; l < md->n_layers; l++) {
        const Block *B = md->blocks + l;
        layer_norm(x, B->ln1_w, B->ln1_b, h, M, C, md->eps);
        if (B->n_qkv == 1) {
            linear(&B->qkv[0], h, qkv, M, threads);  /* (M, 3C): queries, keys, values */
        } else {
            for (int64_t j = 0; j < 3; j++) {
                linear(&B->qkv[j], h, part, M, threads);
                for (int64_t m = 0; m < M; m++)
                    for (int64_t c = 0; c < C; c++) qkv[m * 3 * C + j * C + c] = part[m * C + c];
            }
        }
        /* each (row, head): write the new key and value at the row's position, attend to positions 0 .. pos */
        #pragma omp parallel for schedule(static) num_threads(M * H * longest * D >= (1 << 16) ? threads : 1)
        for (int64_t mh = 0; mh < M * H; mh++) {
            const int64_t m = mh / H, hd = mh % H, p = pos[m];
            float *kc = k_cache + l * layer_stride + m * row_stride + hd * max_len * D;
            float *vc = v_cache + l * layer_stride + m * row_stride + hd * max_len * D;
            const float *q = qkv + m * 3 * C + hd * D;
            memcpy(kc + p * D, q + C, sizeof(float) * D);
            memcpy(vc + p * D, q + 2 * C, sizeof(float) * D);
            float *s = scores + mh * longest, top = -INFINITY, sum = 0.0f;
            for (int64_t j = 0; j <= p; j++) {
                s[j] = dot(q, kc + j * D, D) * att_scale;
                top = s[j] > top ? s[j] : top;
            }
            for (int64_t j = 0; j <= p; j++) sum += (s[j] = expf(s[j] - top));
            float *out = ctx + m * C + hd * D;
            memset(out, 0, sizeof(float) * D);
            for (int64_t j = 0; j <= p; j++) axpy(s[j] / sum, vc + j * D, out, D);
        }
        linear(&B->att_out, ctx, part, M, threads);
        for (int64_t i = 0; i < M * C; i++) x[i] += part[i];

        layer_norm(x, B->ln2_w, B->ln2_b, h, M, C, md->eps);
        linear(&B->fc, h, ff, M, threads);
        #pragma omp parallel for schedule(static) num_threads(M * F >= (1 << 14) ? threads : 1)
        for (int64_t i = 0; i < M * F; i++) {
            const float v = ff[i];
            ff[i] = md->gelu_tanh ? 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)))
                                  : 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
        }
        linear(&B->ff_out, ff, part, M, threads);
        for (int64_t i = 0; i < M * C; i++) x[i] += part[i];
    }
    layer_norm(x, md->lnf_w, md->lnf_b, h, M, C, md->eps);
    linear(&md->head, h, logits, M, threads);
    free(x); free(h); free(ctx); free(qkv); free(part); free(ff); free(scores);
    return 0;
}
