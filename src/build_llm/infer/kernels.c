/* The decoding kernels of build_llm.infer.kernels (see its docstring): matvec_bf16, matvec_int8, matvec_int4
 * and decode_step, called through ctypes. Shipped as package data; compiled once per machine into the
 * user's cache, under a name that carries a hash of this text, so that an edit here is rebuilt.
 *
 * One library for every x86-64 CPU, choosing at run time: bfloat16 and int8 products run the AVX-512
 * intrinsics below where the CPU has AVX-512 (F, BW, VL), else AVX2 intrinsics where it has AVX2 and FMA
 * (int4's product: AVX2 wherever the CPU has it), else portable C over the same packed layout; the portable
 * loops (the decoding step's included) are compiled twice, for x86-64-v3 (AVX2, FMA) and for any x86-64,
 * and the loader picks the clone the CPU runs. The same numbers either way, up to the order of float32
 * additions. */
#define _GNU_SOURCE  /* pthread_setname_np */
#include <float.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* y[m, n] = sum_k x[m, k] * W[n, k] (* scale[n]) (+ bias[n]) for m < M, n < N. W is packed (see `pack`):
   tiles of 4 rows x 32 columns, row-major within a tile, the tiles of 4 rows one after another along
   k, so that the kernel reads it front to back. Each input row meets a block of 4 rows while those
   are in the L1 cache; blocks are shared among `threads` threads of the pool below, in chunks of about
   CHUNK_BYTES of weights, when the matrix is large enough to pay for waking them. */
#define PARALLEL_MIN (1 << 18)
#ifndef CHUNK_BYTES  /* -D: for measuring others */
#define CHUNK_BYTES (128 << 10)  /* 32 KB claimed 4 times as often: more CPU a token for no gain (gpt2-small int8) */
#endif
#ifndef POOL_SPIN_US
#define POOL_SPIN_US 50  /* a worker's spin before it sleeps; $BUILD_LLM_POOL_SPIN_US sets it */
#endif
#define INT4_GROUP 64  /* quant.INT4_GROUP: int4's default group of columns sharing a scale */
#define INT8_CHUNK 4096  /* int8 sums exactly in int32 over at most this many columns (see int8_rows) */
#ifndef INT8_MR  /* -D: for measuring others */
#define INT8_MR 2  /* input rows per widened weight tile in the AVX2 int8 kernel (see int8_rows_avx2) */
#endif
#define INT8_ROWS 16  /* input rows a portable int8 block function takes at a time */
/* A step's per-row work (norms, an int8 product's input rounding) is shared among threads when it has ROWS_SHARED
   rows or more, 4096 values or more, and (rounding) belongs to a shared product: a 16-row gpt2-small step did 0.6 ms
   of it a step on one thread */
#define ROWS_SHARED 4
#define SHARED_ROWS(M, width, shared) ((M) >= ROWS_SHARED && (M) * (width) >= 4096 && (shared))
/* Both kernels ask for the weights PREFETCH ahead of the ones they multiply (into L1): one core alone cannot
   keep enough reads in flight to use the memory's bandwidth. Measured over gpt2-small's 49 products on the
   development machine (2 cores): bfloat16 23-25 ms -> 18 ms, int8 15 ms -> 10 ms a token. */
#define PREFETCH 4096
#define STORE(v, m, x_scale)                                                                          \
    for (int64_t r = 0; r < 4 && n0 + r < N; r++)                                                      \
        y[(m) * N + n0 + r] = v[r] * (x_scale) * (scale ? scale[n0 + r] : 1.0f) + (bias ? bias[n0 + r] : 0.0f);

/* -DKERNELS_PORTABLE builds the portable C alone, for any x86-64 (the tests check it on CPUs that have more) */
#ifdef KERNELS_PORTABLE
#define CLONES
#define HAS(feature) 0
#else
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define HAS(feature) __builtin_cpu_supports(feature)
#endif

/* The step that rounds inputs whose largest magnitude is `top` to integers of at most `levels` (32767: int8's rows;
   127: int4's groups), and into *inv the factor the inputs are multiplied by before rounding (1 / step, or 0).
   top NaN or infinite (a damaged model's activations): step NaN, so that every output those inputs reach is NaN, as
   float arithmetic would give and `generate` reports, never a finite number (their values are then all rounded to
   0: *inv is 0, and C's conversion of a NaN to an integer is undefined). top 0, or so small that 1 / step overflows
   float32 (top < levels * 2^-128): step 1 and every value 0. */
static inline float input_step(float top, float levels, float *inv) {
    if (!(top <= FLT_MAX)) {
        *inv = 0.0f;
        return NAN;
    }
    const float step = top / levels;
    *inv = 1.0f / step;
    if (*inv <= FLT_MAX) return step;
    *inv = 0.0f;
    return 1.0f;
}

/* max |x[k]| for k < n, or NaN if some x[k] is a NaN or an infinity. On the bits: a float's magnitude bits order as
   its magnitude, with infinity and NaN above every finite value; an integer maximum, unlike a float one, the
   compiler vectorises. */
static inline float largest_magnitude(const float *x, int64_t n) {
    uint32_t most = 0;
    for (int64_t k = 0; k < n; k++) {
        uint32_t b;
        memcpy(&b, x + k, sizeof b);
        b &= 0x7FFFFFFFu;
        most = b > most ? b : most;
    }
    float top;
    memcpy(&top, &most, sizeof top);
    return most >= 0x7F800000u ? NAN : top;
}

/* x rounded to int16 per row as the AVX-512 int8 kernel rounds it (to nearest, ties to even; saturated): row m's
   scale into xs[m] (see input_step), its Kp (zero-padded) values into xq. Used by the portable int8 kernel. */
static CLONES void quantize_rows(const float *x, int16_t *xq, float *xs, int64_t M, int64_t K, int64_t Kp) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float inv;
        xs[m] = input_step(largest_magnitude(xm, K), 32767.0f, &inv);
        if (inv == 0.0f) {  /* (a test outside the loop: inside, it kept the rounding from being vectorised) */
            memset(xq + m * Kp, 0, sizeof(int16_t) * Kp);
            continue;
        }
        for (int64_t k = 0; k < Kp; k++) {
            const float q = k < K ? nearbyintf(xm[k] * inv) : 0.0f;
            xq[m * Kp + k] = (int16_t)(q > 32767.0f ? 32767.0f : q < -32768.0f ? -32768.0f : q);
        }
    }
}

/* ---- The work-sharing pool: how a product's rows are shared among threads ----
   A region's work is `items` (blocks of weight rows, heads, elements) cut into chunks of `per` items. Threads claim
   chunks from an atomic ticket, the caller among them, and the region is over when every chunk is done (an atomic
   count), not when every thread has arrived: a thread that is not running (its core busy with another process or
   with the server's other threads) is simply not waited for, and when it wakes late it finds nothing left and waits
   again. (An OpenMP `parallel for` ends at a barrier every thread must reach: on busy cores each region waited for a
   descheduled thread.) Each chunk is computed by one thread with the serial code, so the numbers are the same
   bits whatever the schedule and the thread count.

   Workers are started lazily, up to the count a caller asks for, and wait by spinning for `spin_us` microseconds
   (consecutive regions of a step follow each other within microseconds) then sleeping on a futex. The caller works
   until no chunk is left unclaimed, then spins, then sleeps until the last claimed chunk is done (a sleeping core
   is one the scheduler can move that chunk's thread to). One region runs at a time; a second caller meanwhile
   computes its own work alone. A forked child starts with no workers (they are not copied by fork) and makes its
   own; the workers are joined at exit. */
typedef void (*Work)(const void *ctx, int64_t lo, int64_t hi);
#define MAX_WORKERS 63
#define MAX_CHUNKS 4096  /* the ticket holds chunks << 32 | next; a region with more items takes larger chunks */

static struct {
    pthread_mutex_t region;                   /* held by the caller of the region in flight */
    pthread_t tid[MAX_WORKERS];
    int workers, spin_us;                     /* workers started (numbered 1 ..); spin before sleeping */
    _Atomic uint64_t ticket;                  /* this region's chunks << 32 | the next chunk to claim */
    _Atomic uint32_t gen, done;               /* futex words: bumped by each region; chunks finished in it */
    _Atomic uint32_t hold;                    /* tests: the worker held before it claims (0: none) */
    _Atomic int sleepers, caller_asleep, stop, active;
    Work fn; const void *ctx; int64_t items, per;  /* the region's work: read by a thread once it holds a chunk */
    _Atomic int64_t stats[5];                 /* regions, chunks by the caller, by workers, worker sleeps, caller sleeps */
} pool = {.region = PTHREAD_MUTEX_INITIALIZER};
enum { REGIONS, BY_CALLER, BY_WORKERS, WORKER_SLEEPS, CALLER_SLEEPS };

static void futex_wait(_Atomic uint32_t *word, uint32_t expected) {  /* returns at once if *word != expected */
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *word) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
}

static int64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

/* Whether *word still holds `value` after spinning up to spin_us (checking the clock every 64 pauses) */
static int spin_while(_Atomic uint32_t *word, uint32_t value) {
    const int64_t until = now_us() + pool.spin_us;
    for (int i = 1; atomic_load_explicit(word, memory_order_acquire) == value; i++) {
        if (i % 64 == 0 && now_us() >= until) return 1;
        _mm_pause();
    }
    return 0;
}

/* Claim and compute chunks of the region in flight until none is left unclaimed; returns how many. The region's
   fields are read only after a chunk is claimed: the region cannot end (nor the next one overwrite them) before
   that chunk is counted done. A ticket with the same value as one this thread saw earlier means the same chunk of
   the region in flight, whichever region that is. `me`: the worker (1 ..), which stops when held; 0: the caller. */
static int held(int me) { return me > 0 && atomic_load_explicit(&pool.hold, memory_order_relaxed) == (uint32_t)me; }

static int64_t claim_chunks(int me) {
    int64_t count = 0;
    uint64_t t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    while ((uint32_t)t < (uint32_t)(t >> 32) && !held(me)) {
        if (!atomic_compare_exchange_weak_explicit(&pool.ticket, &t, t + 1, memory_order_acq_rel, memory_order_acquire))
            continue;
        const int64_t lo = (int64_t)(uint32_t)t * pool.per, hi = lo + pool.per < pool.items ? lo + pool.per : pool.items;
        pool.fn(pool.ctx, lo, hi);
        count++;
        if (atomic_fetch_add(&pool.done, 1) + 1 == (uint32_t)(t >> 32) && atomic_load(&pool.caller_asleep))
            futex_wake(&pool.done);  /* the last chunk, and the caller sleeps: wake it */
        t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    }
    return count;
}

static void *worker(void *arg) {
    const int me = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&pool.gen);
    while (!atomic_load(&pool.stop)) {
        if (atomic_load(&pool.gen) == seen && spin_while(&pool.gen, seen)) {
            atomic_fetch_add(&pool.sleepers, 1);
            atomic_fetch_add_explicit(&pool.stats[WORKER_SLEEPS], 1, memory_order_relaxed);
            futex_wait(&pool.gen, seen);  /* the caller wakes sleepers after it bumps gen */
            atomic_fetch_sub(&pool.sleepers, 1);
            continue;
        }
        seen = atomic_load(&pool.gen);
        while (held(me) && !atomic_load(&pool.stop)) futex_wait(&pool.hold, (uint32_t)me);
        if (me <= atomic_load(&pool.active))  /* a pool grown by an earlier caller: only as many as asked */
            atomic_fetch_add_explicit(&pool.stats[BY_WORKERS], claim_chunks(me), memory_order_relaxed);
    }
    return NULL;
}

static void pool_after_fork_in_child(void) {  /* the workers were not copied: start afresh */
    pool.workers = 0;
    atomic_store(&pool.ticket, 0);
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.caller_asleep, 0);
    pthread_mutex_unlock(&pool.region);  /* locked by this thread before the fork (pool_before_fork) */
}
static void pool_before_fork(void) { pthread_mutex_lock(&pool.region); }  /* no region in flight while forking */
static void pool_after_fork_in_parent(void) { pthread_mutex_unlock(&pool.region); }

static void pool_setup(void) {
    const char *spin = getenv("BUILD_LLM_POOL_SPIN_US");
    pool.spin_us = spin && *spin ? atoi(spin) : POOL_SPIN_US;
    pthread_atfork(pool_before_fork, pool_after_fork_in_parent, pool_after_fork_in_child);
}

/* Start workers up to `want` (with the region held); how many there are */
static int grow(int want) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, pool_setup);
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);  /* signals go to the application's threads, never to a worker */
    while (pool.workers < want && pool.workers < MAX_WORKERS
           && pthread_create(&pool.tid[pool.workers], NULL, worker, (void *)(intptr_t)(pool.workers + 1)) == 0) {
        pthread_setname_np(pool.tid[pool.workers], "build-llm-pool");
        pool.workers++;
    }
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    return pool.workers;
}

/* fn(ctx, lo, hi) over items [0, items) in chunks of `per`, on `threads` threads (the caller's one of them) */
static void share(Work fn, const void *ctx, int64_t items, int64_t per, int threads) {
    per = per > 0 ? per : 1;
    if ((items + per - 1) / per > MAX_CHUNKS) per = (items + MAX_CHUNKS - 1) / MAX_CHUNKS;
    const int64_t chunks = (items + per - 1) / per;
    if (threads < 2 || chunks < 2 || pthread_mutex_trylock(&pool.region) != 0) {
        fn(ctx, 0, items);  /* one thread, one chunk, or another region in flight: the same numbers, here */
        return;
    }
    if (grow(threads - 1 < MAX_WORKERS ? threads - 1 : MAX_WORKERS) == 0) {
        pthread_mutex_unlock(&pool.region);
        fn(ctx, 0, items);
        return;
    }
    pool.fn = fn, pool.ctx = ctx, pool.items = items, pool.per = per;
    atomic_store(&pool.active, threads - 1);
    atomic_store(&pool.done, 0);
    atomic_store_explicit(&pool.ticket, (uint64_t)chunks << 32, memory_order_release);  /* open: chunks claimable */
    atomic_fetch_add(&pool.gen, 1);
    if (atomic_load(&pool.sleepers)) futex_wake(&pool.gen);
    atomic_fetch_add_explicit(&pool.stats[BY_CALLER], claim_chunks(0), memory_order_relaxed);
    uint32_t d = atomic_load(&pool.done);
    if (d < chunks && spin_while(&pool.done, d)) {  /* claimed chunks still running: spin, then sleep */
        atomic_store(&pool.caller_asleep, 1);
        atomic_fetch_add_explicit(&pool.stats[CALLER_SLEEPS], 1, memory_order_relaxed);
        while ((d = atomic_load(&pool.done)) < chunks) futex_wait(&pool.done, d);
        atomic_store(&pool.caller_asleep, 0);
    }
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < chunks) _mm_pause();
    atomic_fetch_add_explicit(&pool.stats[REGIONS], 1, memory_order_relaxed);
    pthread_mutex_unlock(&pool.region);
}

/* Join the workers (the next region starts new ones). Also run at exit; waits at most a second for a region in
   flight in another thread, else leaves the workers to the exiting process. */
void kernels_pool_shutdown(void) {
    struct timespec limit;
    clock_gettime(CLOCK_REALTIME, &limit);
    limit.tv_sec += 1;
    if (pthread_mutex_timedlock(&pool.region, &limit) != 0) return;
    atomic_store(&pool.stop, 1);
    atomic_fetch_add(&pool.gen, 1);
    futex_wake(&pool.gen);
    futex_wake(&pool.hold);
    for (int i = 0; i < pool.workers; i++) pthread_join(pool.tid[i], NULL);
    pool.workers = 0;
    atomic_store(&pool.stop, 0);
    pthread_mutex_unlock(&pool.region);
}
__attribute__((destructor)) static void pool_at_exit(void) { kernels_pool_shutdown(); }

/* For tests and the bench: out[0] = workers running, out[1 ..] = stats (regions, chunks by the caller, by workers,
   worker sleeps, caller sleeps) */
void kernels_pool_stats(int64_t *out) {
    out[0] = pool.workers;
    for (int i = 0; i < 5; i++) out[i + 1] = atomic_load(&pool.stats[i]);
}

/* For tests: worker `worker` (1 ..), once woken for a region, waits before it claims a chunk until released (0) */
void kernels_pool_hold(int worker) {
    atomic_store(&pool.hold, (uint32_t)worker);
    futex_wake(&pool.hold);
}

/* One product's operands, read by every thread that computes some of its blocks of rows */
typedef struct {
    const float *x, *xe, *xo, *xs, *bias;  /* xe, xo: bfloat16's even and odd inputs; xs: int8's/int4's input scales */
    const int16_t *xq;                     /* int8's inputs rounded to int16 */
    const int8_t *x8;                      /* int4's inputs rounded to int8 per group */
    const int32_t *xsum;                   /* int4's per-group input sums times 8 (see quantize_groups) */
    const void *w, *scale;                 /* scale: float32 per row (int8), bfloat16 per group (int4), or NULL */
    float *y;
    int64_t M, N, K, Kp, H, G;
} Product;

static int64_t chunk_of(int64_t item_bytes) { return item_bytes >= CHUNK_BYTES ? 1 : CHUNK_BYTES / item_bytes; }

static int wide(void) {  /* whether this CPU runs the AVX-512 kernels */
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = HAS("avx512f") && HAS("avx512bw") && HAS("avx512vl");
    }
    return known;
}

int kernels_wide(void) { return wide(); }

static int avx2(void) {  /* whether this CPU runs the AVX2 kernels (elsewhere the portable C) */
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = HAS("avx2") && HAS("fma");
    }
    return known;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#define FETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
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

static void bf16_wide_blocks(const void *ctx, int64_t first, int64_t end) {  /* blocks [first, end) of 4 rows */
    const Product *p = ctx;
    const float *xe = p->xe, *xo = p->xo, *scale = p->scale, *bias = p->bias;
    const uint16_t *w = p->w;
    float *y = p->y;
    const int64_t M = p->M, N = p->N, Kp = p->Kp, H = p->H;
    for (int64_t blk = first; blk < end; blk++) {
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
}

static void matvec_bf16_wide(const float *x, const uint16_t *w, const float *scale, const float *bias, float *y,
                             int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t Kp = (K + 31) / 32 * 32, H = Kp / 2;
    float *xe = calloc(2 * M * H, sizeof(float)), *xo = xe + M * H;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) (k % 2 ? xo : xe)[m * H + k / 2] = x[m * K + k];
    const Product p = {.xe = xe, .xo = xo, .bias = bias, .w = w, .scale = scale, .y = y, .M = M, .N = N, .Kp = Kp, .H = H};
    share(bf16_wide_blocks, &p, (N + 3) / 4, chunk_of(8 * Kp), N * K >= PARALLEL_MIN ? threads : 1);
    free(xe);
}

/* int8: x is rounded to int16 with a scale per row (x * (32767 / max |x|), saturated: 15 significant bits), and the
   products are summed exactly in int32 (`vpmaddwd`: 32 products per instruction, added in pairs), over
   at most 4096 columns at a time so that no sum can overflow (4096 * 32767 * 127 < 2^31 * 2), then
   converted to float32. `int8_rows` is `bf16_rows` for int8: each tile sign-extended once for MR rows. */
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

static void int8_block_wide(const int8_t *wb, const int16_t *xq, int64_t M, int64_t Kp, float dot[][4]) {
    int64_t m = 0;
    for (; M - m >= 4; m += 4) int8_rows(4, wb, xq + m * Kp, Kp, dot + m);
    for (; m < M; m++) int8_rows(1, wb, xq + m * Kp, Kp, dot + m);
}

/* quantize_rows in AVX-512, 16 at a time; the rounding is to nearest, ties to even */
static void quantize_rows_wide(const float *x, int16_t *xq, float *xs, int64_t M, int64_t K, int64_t Kp) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        __m512 amax = _mm512_setzero_ps();
        __mmask16 bad = 0;  /* lanes that held a NaN or an infinity (max_ps may drop a NaN) */
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 in = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(in, xm + k));
            amax = _mm512_max_ps(amax, a);
            bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ);
        }
        float by;  /* as in quantize_rows; 0 for a row holding a NaN or an infinity, whose values then round to 0 (or
                      -32768 where x * 0 is NaN): its step NaN makes every output NaN whatever they are */
        xs[m] = input_step(bad ? NAN : _mm512_reduce_max_ps(amax), 32767.0f, &by);
        const __m512 inv = _mm512_set1_ps(by);
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 in = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, xm + k), inv));
            _mm256_mask_storeu_epi16(xq + m * Kp + k, in, _mm512_cvtsepi32_epi16(q));
        }
    }
}

#pragma GCC pop_options

static inline float bf16_to_float(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

/* float32 -> bfloat16 as PyTorch converts: to nearest, ties to even (past the largest bfloat16: infinity); NaN 0x7FC0
   (a select, not a branch: the loops over it are vectorised) */
static inline uint16_t float_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    const uint16_t rounded = (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
    return f != f ? 0x7FC0 : rounded;
}

static CLONES void narrow(const float *x, uint16_t *out, int64_t n) {  /* n float32 -> out (bfloat16) */
    for (int64_t i = 0; i < n; i++) out[i] = float_to_bf16(x[i]);
}

static inline const float *widen(const uint16_t *b, float *out, int64_t n) {  /* n bfloat16 -> out (float32); out */
    for (int64_t i = 0; i < n; i++) out[i] = bf16_to_float(b[i]);
    return out;
}

/* AVX2 (with FMA) for one block of 4 weight rows against the input rows (bfloat16: one at a time; int8: in pairs,
   see int8_rows_avx2), where the compiler's vectorisation of the portable loops below is slow (measured on an AVX2
   CPU, 3072 x 768, one thread: int8 9.7 and bfloat16 10.2 billion weights a second through those loops). int8: 16 weights widen to 16 int16 lanes and one `vpmaddwd` multiplies
   them by 16 int16 inputs into 8 int32 sums, exact (over an INT8_CHUNK of columns a lane adds 512 products of at
   most 32768 * 127 < 2^31 / 512); the lanes are then added in int64, so the result equals the portable C's bit for
   bit. bfloat16: as in the AVX-512 kernel, a 32-bit lane holds a pair; the even weight becomes a float by a shift
   to the top half, the odd one by clearing the bottom half, and they meet x's even and odd entries (split once per
   call: a row of `xm` holds its Kp / 2 even entries, then its odd ones). */
#pragma GCC push_options
#pragma GCC target("avx2,fma")
/* dot[r] += the sum of s[r]'s 8 int32 lanes, for 4 rows r: added exactly in int64 (4 lanes at a time), then converted */
static inline __attribute__((always_inline)) void int8_totals_avx2(const __m256i s[4], float dot[4]) {
    __m256i q[4];  /* q[r]: s[r]'s lanes in 4 int64 lanes, each the sum of two */
    for (int r = 0; r < 4; r++)
        q[r] = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(s[r])),
                                _mm256_cvtepi32_epi64(_mm256_extracti128_si256(s[r], 1)));
    const __m256i ab = _mm256_add_epi64(_mm256_unpacklo_epi64(q[0], q[1]), _mm256_unpackhi_epi64(q[0], q[1]));
    const __m256i cd = _mm256_add_epi64(_mm256_unpacklo_epi64(q[2], q[3]), _mm256_unpackhi_epi64(q[2], q[3]));
    int64_t total[4];  /* ab: row 0's, 1's, 0's, 1's halves; cd: rows 2, 3 */
    _mm256_storeu_si256((__m256i *)total, _mm256_add_epi64(_mm256_permute2x128_si256(ab, cd, 0x20),
                                                            _mm256_permute2x128_si256(ab, cd, 0x31)));
    for (int r = 0; r < 4; r++) dot[r] += (float)total[r];
}

/* MR input rows (1-3, a constant once inlined) against one block of 4 weight rows: each tile row is loaded and
   widened once for all MR rows (`vpmovsxbw`: 16 weights to 16 lanes of 16 bits), then meets each row's inputs
   (read from the L1 cache) in one `vpmaddwd` per 16 columns. Measured on the development machine (one thread,
   gpt2-small's 49 int8 products at 16 rows, CPU time): MR = 2 and int8_totals_avx2 45 ms a step, against 50 ms
   for one row at a time with the lanes added one by one; MR = 3 or 4 no faster (the sums no longer fit AVX2's 16
   registers), nor widening by shifts. Every (input row, weight row) sum takes the same lanes, in the same order,
   as with MR = 1: the same exact integers, the same float conversions. */
static inline __attribute__((always_inline)) void int8_rows_avx2(const int MR, const int8_t *wb, const int16_t *xq,
                                                                 int64_t Kp, float dot[][4]) {
    for (int64_t k0 = 0; k0 < Kp; k0 += INT8_CHUNK) {
        const int64_t k1 = k0 + INT8_CHUNK < Kp ? k0 + INT8_CHUNK : Kp;
        __m256i s[4][4];
        for (int i = 0; i < MR; i++)
            for (int r = 0; r < 4; r++) s[i][r] = _mm256_setzero_si256();
        for (int64_t k = k0; k < k1; k += 32) {
            const int8_t *t = wb + k * 4;  /* this tile: 4 rows of 32 weights */
            FETCH(t + PREFETCH); FETCH(t + PREFETCH + 64);
            for (int r = 0; r < 4; r++) {
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(t + 32 * r)));
                const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(t + 32 * r + 16)));
                for (int i = 0; i < MR; i++) {
                    const int16_t *xm = xq + i * Kp + k;
                    s[i][r] = _mm256_add_epi32(s[i][r], _mm256_add_epi32(
                        _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xm)),
                        _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xm + 16)))));
                }
            }
        }
        for (int i = 0; i < MR; i++) int8_totals_avx2(s[i], dot[i]);
    }
}

static void int8_block_avx2(const int8_t *wb, const int16_t *xq, int64_t M, int64_t Kp, float dot[][4]) {
    int64_t m = 0;
    for (; M - m >= INT8_MR; m += INT8_MR) int8_rows_avx2(INT8_MR, wb, xq + m * Kp, Kp, dot + m);
    for (; m < M; m++) int8_rows_avx2(1, wb, xq + m * Kp, Kp, dot + m);
}

static void bf16_block_avx2(const uint16_t *wb, const float *xm, int64_t Kp, float dot[4]) {
    const float *xe = xm, *xo = xm + Kp / 2;
    const __m256i top = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 even[4], odd[4];
    for (int r = 0; r < 4; r++) even[r] = odd[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < Kp; k += 32) {
        const uint16_t *t = wb + k * 4;  /* this tile: 4 rows of 32 weights, 256 bytes */
        FETCH(t + PREFETCH); FETCH(t + PREFETCH + 32); FETCH(t + PREFETCH + 64); FETCH(t + PREFETCH + 96);
        const __m256 e0 = _mm256_loadu_ps(xe + k / 2), e1 = _mm256_loadu_ps(xe + k / 2 + 8);
        const __m256 o0 = _mm256_loadu_ps(xo + k / 2), o1 = _mm256_loadu_ps(xo + k / 2 + 8);
        for (int r = 0; r < 4; r++) {
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(t + 32 * r));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(t + 32 * r + 16));
            even[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), e0, even[r]);
            odd[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, top)), o0, odd[r]);
            even[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), e1, even[r]);
            odd[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, top)), o1, odd[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        const __m256 v = _mm256_add_ps(even[r], odd[r]);
        const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
        dot[r] = _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
    }
}
#pragma GCC pop_options

/* Portable C of the same two kernels over the same packed layout: for each block of 4 weight rows, each
   tile's 32 columns are multiplied into 32 accumulators a row (contiguous: the compiler vectorises them). */
static void bf16_block_portable(const uint16_t *wb, const float *xm, int64_t Kp, float dot[4]) {
    float acc[4][32] = {{0}};
    for (int64_t k = 0; k < Kp; k += 32)
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 32; c++) acc[r][c] += xm[k + c] * bf16_to_float(wb[k * 4 + 32 * r + c]);
    for (int r = 0; r < 4; r++) {
        dot[r] = 0.0f;
        for (int c = 0; c < 32; c++) dot[r] += acc[r][c];
    }
}

static CLONES void bf16_portable_blocks(const void *ctx, int64_t first, int64_t end) {
    const Product *p = ctx;
    const float *xp = p->x, *scale = p->scale, *bias = p->bias;  /* see matvec_bf16_portable */
    const uint16_t *w = p->w;
    float *y = p->y;
    const int64_t M = p->M, N = p->N, Kp = p->Kp;
    void (*block)(const uint16_t *, const float *, int64_t, float *) = avx2() ? bf16_block_avx2 : bf16_block_portable;
    for (int64_t blk = first; blk < end; blk++) {
        const int64_t n0 = blk * 4;
        const uint16_t *wb = w + blk * 4 * Kp;
        for (int64_t m = 0; m < M; m++) {
            float dot[4];
            block(wb, xp + m * Kp, Kp, dot);
            STORE(dot, m, 1.0f)
        }
    }
}

static CLONES void matvec_bf16_portable(const float *x, const uint16_t *w, const float *scale, const float *bias,
                                        float *y, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t Kp = (K + 31) / 32 * 32;
    const int split = avx2();
    float *xp = calloc(M * Kp, sizeof(float));  /* x zero-padded to Kp columns; for AVX2 its even entries, then its odd */
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) xp[m * Kp + (split ? (k & 1) * Kp / 2 + k / 2 : k)] = x[m * K + k];
    const Product p = {.x = xp, .bias = bias, .w = w, .scale = scale, .y = y, .M = M, .N = N, .Kp = Kp};
    share(bf16_portable_blocks, &p, (N + 3) / 4, chunk_of(8 * Kp), N * K >= PARALLEL_MIN ? threads : 1);
    free(xp);
}

static void int8_block_portable(const int8_t *wb, const int16_t *xq, int64_t M, int64_t Kp, float dot[][4]) {
    for (int64_t m = 0; m < M; m++) {
        const int16_t *xm = xq + m * Kp;
        for (int64_t k0 = 0; k0 < Kp; k0 += INT8_CHUNK) {  /* exact int32 sums, as in the AVX-512 kernel */
            const int64_t k1 = k0 + INT8_CHUNK < Kp ? k0 + INT8_CHUNK : Kp;
            int32_t sum[4][32] = {{0}};
            for (int64_t k = k0; k < k1; k += 32)
                for (int r = 0; r < 4; r++)
                    for (int c = 0; c < 32; c++) sum[r][c] += (int32_t)xm[k + c] * wb[k * 4 + 32 * r + c];
            for (int r = 0; r < 4; r++) {
                int64_t total = 0;
                for (int c = 0; c < 32; c++) total += sum[r][c];
                dot[m][r] += (float)total;
            }
        }
    }
}

static CLONES void int8_blocks(const void *ctx, int64_t first, int64_t end) {
    const Product *p = ctx;
    const float *xs = p->xs, *scale = p->scale, *bias = p->bias;
    const int16_t *xq = p->xq;
    const int8_t *w = p->w;
    float *y = p->y;
    const int64_t M = p->M, N = p->N, Kp = p->Kp;
    void (*block)(const int8_t *, const int16_t *, int64_t, int64_t, float[][4]) =
        wide() ? int8_block_wide : avx2() ? int8_block_avx2 : int8_block_portable;
    for (int64_t blk = first; blk < end; blk++) {
        const int64_t n0 = blk * 4;
        const int8_t *wb = w + blk * 4 * Kp;
        for (int64_t m = 0; m < M; m += INT8_ROWS) {  /* the block's 4 rows stay in the L1 cache for every input row */
            const int64_t rows = M - m < INT8_ROWS ? M - m : INT8_ROWS;
            float dot[INT8_ROWS][4];
            for (int64_t i = 0; i < rows; i++) dot[i][0] = dot[i][1] = dot[i][2] = dot[i][3] = 0.0f;  /* not all 16 */
            block(wb, xq + m * Kp, rows, Kp, dot);
            for (int64_t i = 0; i < rows; i++) { STORE(dot[i], m + i, xs[m + i]) }
        }
    }
}


void matvec_bf16(const float *x, const uint16_t *w, const float *scale, const float *bias, float *y,
                 int64_t M, int64_t N, int64_t K, int threads) {
    (wide() ? matvec_bf16_wide : matvec_bf16_portable)(x, w, scale, bias, y, M, N, K, threads);
}

typedef struct { const float *x; int16_t *xq; float *xs; int64_t K, Kp; } Rounding;  /* int8's inputs, rows m.. */

static void round_rows(const void *ctx, int64_t first, int64_t end) {  /* rows [first, end), each on its own */
    const Rounding *r = ctx;
    (wide() ? quantize_rows_wide : quantize_rows)(r->x + first * r->K, r->xq + first * r->Kp, r->xs + first, end - first,
                                                  r->K, r->Kp);
}

void matvec_int8(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                 int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t Kp = (K + 31) / 32 * 32;
    int16_t *xq = calloc(M * Kp, sizeof(int16_t));
    float *xs = calloc(M, sizeof(float));
    const Rounding r = {x, xq, xs, K, Kp};
    share(round_rows, &r, M, 1, SHARED_ROWS(M, K, N * K >= PARALLEL_MIN) ? threads : 1);
    const Product p = {.xq = xq, .xs = xs, .bias = bias, .w = w, .scale = scale, .y = y, .M = M, .N = N, .Kp = Kp};
    share(int8_blocks, &p, (N + 3) / 4, chunk_of(4 * Kp), N * K >= PARALLEL_MIN ? threads : 1);
    free(xq);
    free(xs);
}

/* int4: W[n, k] = scale[n, k / G] * q[n, k] with q in [-8, 7] and one bfloat16 scale per group of G columns
   (G a multiple of 32). Row n is Kp / 2 bytes (Kp: K padded to a multiple of G): within each group, byte j
   holds q[j] + 8 in its low 4 bits and q[j + G/2] + 8 in its high 4 bits, so that both halves meet
   contiguous inputs. x is rounded to int8 per group of the same G columns (`quantize_groups`), so that each
   group's products are integers summed exactly in int32 (|sum| <= G * 8 * 127), then multiplied by the weight's
   scale times the input's, added into a float32 sum. */
#define XGROUPS(groups) (((groups) + 7) / 8 * 8)  /* the input's scales and sums per row: padded for 8-group loads */

/* Row m of x (K values, zero-padded to Kp) rounded to int8 per group of G columns: the group's scale
   xs[g] = max |x| / 127 (1 for an all-zero group: its values are then 0; NaN for a group holding a NaN or an
   infinity: see input_step), x8 = x * (1 / xs) rounded to nearest (ties to even), and xsum[g] = 8 * the group's sum of x8 (the stored weights' +8 share, taken off each group's sum).
   Rows of xs and xsum are XGROUPS(Kp / G) long, the padding 0. */
static void quantize_group(const float *xg, int8_t *qg, int64_t n, float *xs, int32_t *xsum) {  /* n columns */
    float inv;
    const float scale = input_step(largest_magnitude(xg, n), 127.0f, &inv);
    int32_t sum = 0;
    for (int64_t j = 0; j < n; j++) {
        const float q = inv > 0.0f ? nearbyintf(xg[j] * inv) : 0.0f;
        qg[j] = (int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q);
        sum += qg[j];
    }
    *xs = scale;
    *xsum = 8 * sum;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")
/* The same for 64 columns with AVX2, to the bit: the same float32 maximum, division, product and rounding */
static void quantize_group_avx2(const float *xg, int8_t *qg, float *xs, int32_t *xsum) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)), finite = _mm256_set1_ps(FLT_MAX);
    __m256 v[8], top = _mm256_setzero_ps(), bad = top;  /* bad: lanes that held a NaN or an infinity */
    for (int i = 0; i < 8; i++) {
        v[i] = _mm256_loadu_ps(xg + 8 * i);
        const __m256 a = _mm256_and_ps(v[i], magnitude);
        top = _mm256_max_ps(a, top);  /* (a NaN in `a` is dropped here: `bad` keeps it) */
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, finite, _CMP_NLE_UQ));
    }
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    const float most = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
    float inv;
    const float scale = input_step(_mm256_movemask_ps(bad) ? NAN : most, 127.0f, &inv);
    if (inv == 0.0f) {  /* as quantize_group: every value 0 */
        memset(qg, 0, 64);
        *xs = scale;
        *xsum = 0;
        return;
    }
    const __m256 by = _mm256_set1_ps(inv), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    __m256i q[8], sum = _mm256_setzero_si256();
    for (int i = 0; i < 8; i++) {
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], by), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q[i] = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(r, hi), lo));
        sum = _mm256_add_epi32(sum, q[i]);
    }
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  /* packs work within 128-bit halves */
    for (int i = 0; i < 8; i += 4) {
        const __m256i lo = _mm256_packs_epi32(q[i], q[i + 1]), hi = _mm256_packs_epi32(q[i + 2], q[i + 3]);
        const __m256i b = _mm256_packs_epi16(lo, hi);
        _mm256_storeu_si256((__m256i *)(qg + 8 * i), _mm256_permutevar8x32_epi32(b, order));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    *xs = scale;
    *xsum = 8 * (_mm_cvtsi128_si32(s) + _mm_extract_epi32(s, 1));
}
#pragma GCC pop_options

static void quantize_groups(const float *x, int8_t *x8, float *xs, int32_t *xsum, int64_t M, int64_t K, int64_t Kp,
                            int64_t G) {
    const int64_t groups = Kp / G, stride = XGROUPS(groups);
    memset(x8, 0, M * Kp);  /* the last group's columns past K, and the padding groups' scales and sums */
    memset(xs, 0, sizeof(float) * M * stride);
    memset(xsum, 0, sizeof(int32_t) * M * stride);
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t at = g * G, n = K - at < G ? K - at : G;
            float *scale = xs + m * stride + g;
            int32_t *sum = xsum + m * stride + g;
            if (n == 64 && avx2()) quantize_group_avx2(x + m * K + at, x8 + m * Kp + at, scale, sum);
            else quantize_group(x + m * K + at, x8 + m * Kp + at, n, scale, sum);
        }
}

static float int4_row_portable(const uint8_t *wr, const uint16_t *sr, const int8_t *xm, const float *xs,
                               int64_t Kp, int64_t G) {
    float acc = 0.0f;
    const int64_t half = G / 2;
    for (int64_t g = 0; g < Kp / G; g++) {
        const uint8_t *b = wr + g * half;
        const int8_t *lo = xm + g * G, *hi = lo + half;
        int32_t s = 0;
        for (int64_t j = 0; j < half; j++) s += lo[j] * ((b[j] & 15) - 8) + hi[j] * ((b[j] >> 4) - 8);
        acc += (float)s * (bf16_to_float(sr[g]) * xs[g]);
    }
    return acc;
}

/* The same with AVX2 for G = 64, four weight rows at a time. A group's 32 bytes meet its 64 inputs directly: the
   low nibbles (q + 8, 0..15, unsigned) times inputs 0-31 and the high nibbles times inputs 32-63 in `vpmaddubsw`
   (pairs of products summed into int16: at most 2 * 15 * 127 = 3810 each, the halves' sum 7620). Eight groups'
   vectors are then summed horizontally in int16 (two rounds of pairs: at most 4 * 7620 = 30480, exact) and in
   int32 into one vector of 8 group sums, the 8s' share taken off (`xsum`), and multiplied by 8 weight scales times
   8 input scales at once; a row's last 4 groups (if any) 4 at a time, and its last 1-3 one at a time. */
#pragma GCC push_options
#pragma GCC target("avx2,fma")
static inline __attribute__((always_inline)) __m256i int4_group_avx2(const uint8_t *at, const int8_t *x8) {
    const __m256i nibble = _mm256_set1_epi8(15);
    const __m256i v = _mm256_loadu_si256((const __m256i *)at);
    const __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(v, nibble), _mm256_loadu_si256((const __m256i *)x8));
    const __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble),
                                            _mm256_loadu_si256((const __m256i *)(x8 + 32)));
    return _mm256_add_epi16(lo, hi);  /* 16 int16 lanes of the group's 64 products, in pairs */
}

/* 4 groups' int16 lane vectors -> their 4 sums in int32 lanes, group i in lane i. Two rounds of pairs in int16 (at
   most 4 * 7620 = 30480: exact), a third into int32: each 128-bit half then holds the 4 groups' half-sums. */
static inline __attribute__((always_inline)) __m256i int4_halves4_avx2(const __m256i s[4]) {
    return _mm256_madd_epi16(_mm256_hadd_epi16(_mm256_hadd_epi16(s[0], s[1]), _mm256_hadd_epi16(s[2], s[3])),
                             _mm256_set1_epi16(1));
}

static inline __attribute__((always_inline)) __m256 bf16x8_avx2(const uint16_t *b) {  /* 8 bfloat16 -> float32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)b)), 16));
}

/* Row r's groups [g0, g0 + 8): their exact sums (8s' share taken off) times their scales, added into acc */
static inline __attribute__((always_inline)) __m256 int4_groups8_avx2(const uint8_t *at, const int8_t *x8,
                                                                       const uint16_t *w_scale, __m256 x_scale,
                                                                       __m256i share, __m256 acc) {
    __m256i half[2];
    for (int h = 0; h < 2; h++) {  /* groups 4h .. 4h + 3 as in int4_halves4_avx2, each pair summed once computed */
        const uint8_t *a = at + 128 * h;
        const int8_t *xa = x8 + 4 * h * INT4_GROUP;
        FETCH(a + PREFETCH); FETCH(a + 64 + PREFETCH);  /* these 4 groups' 2 lines, PREFETCH bytes ahead */
        const __m256i p = _mm256_hadd_epi16(int4_group_avx2(a, xa), int4_group_avx2(a + 32, xa + INT4_GROUP));
        const __m256i q = _mm256_hadd_epi16(int4_group_avx2(a + 64, xa + 2 * INT4_GROUP),
                                            int4_group_avx2(a + 96, xa + 3 * INT4_GROUP));
        half[h] = _mm256_madd_epi16(_mm256_hadd_epi16(p, q), _mm256_set1_epi16(1));
    }
    /* half[0]: groups 0-3's low halves' sums, then their high halves'; half[1]: groups 4-7's */
    const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(half[0], half[1], 0x20),
                                          _mm256_permute2x128_si256(half[0], half[1], 0x31));
    const __m256 scales = _mm256_mul_ps(bf16x8_avx2(w_scale), x_scale);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sums, share)), scales, acc);
}

/* Row r's groups [g0, g0 + 4): the same, 4 groups in 4 float32 lanes */
static inline __attribute__((always_inline)) __m128 int4_groups4_avx2(const uint8_t *at, const int8_t *x8,
                                                                       const uint16_t *w_scale, const float *xs,
                                                                       const int32_t *xsum, __m128 acc) {
    __m256i s[4];
    for (int i = 0; i < 4; i++) s[i] = int4_group_avx2(at + 32 * i, x8 + i * INT4_GROUP);
    const __m256i h = int4_halves4_avx2(s);
    const __m128i sums = _mm_sub_epi32(_mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)),
                                       _mm_loadu_si128((const __m128i *)xsum));
    const __m128i w16 = _mm_loadl_epi64((const __m128i *)w_scale);  /* 4 bfloat16 */
    const __m128 w4 = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(w16), 16));
    return _mm_fmadd_ps(_mm_cvtepi32_ps(sums), _mm_mul_ps(w4, _mm_loadu_ps(xs)), acc);
}

/* Row r's last 1-3 groups, one at a time */
static inline float int4_rest_avx2(const uint8_t *at, const int8_t *x8, const uint16_t *w_scale, const float *xs,
                                   const int32_t *xsum, int64_t n) {
    float acc = 0.0f;
    for (int64_t g = 0; g < n; g++) {
        const __m256i s = _mm256_madd_epi16(int4_group_avx2(at + 32 * g, x8 + g * INT4_GROUP), _mm256_set1_epi16(1));
        const __m128i four = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        const __m128i two = _mm_add_epi32(four, _mm_unpackhi_epi64(four, four));
        const int32_t sum = _mm_cvtsi128_si32(two) + _mm_extract_epi32(two, 1) - xsum[g];
        acc += (float)sum * (bf16_to_float(w_scale[g]) * xs[g]);
    }
    return acc;
}

static inline __attribute__((always_inline)) void int4_rows_avx2(const int R, const uint8_t *w, const uint16_t *scale,
                                                                 const int8_t *x8, const float *xs, const int32_t *xsum,
                                                                 int64_t Kp, float dot[4]) {
    const int64_t bytes = Kp / 2, groups = Kp / INT4_GROUP, by8 = groups / 8 * 8, by4 = groups / 4 * 4;
    __m256 acc[4];
    __m128 four[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < by8; g0 += 8) {
        const __m256 x_scale = _mm256_loadu_ps(xs + g0);
        const __m256i share = _mm256_loadu_si256((const __m256i *)(xsum + g0));
        for (int r = 0; r < R; r++)
            acc[r] = int4_groups8_avx2(w + r * bytes + g0 * 32, x8 + g0 * INT4_GROUP, scale + r * groups + g0, x_scale,
                                       share, acc[r]);
    }
    for (int r = 0; r < R; r++) {
        four[r] = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        if (by4 > by8)
            four[r] = int4_groups4_avx2(w + r * bytes + by8 * 32, x8 + by8 * INT4_GROUP, scale + r * groups + by8,
                                        xs + by8, xsum + by8, four[r]);
    }
    if (R == 4) {  /* the 4 rows' 4 lanes summed together: row r's sum in lane r */
        const __m128 sums = _mm_hadd_ps(_mm_hadd_ps(four[0], four[1]), _mm_hadd_ps(four[2], four[3]));
        _mm_storeu_ps(dot, sums);
    } else {
        const __m128 two = _mm_add_ps(four[0], _mm_movehl_ps(four[0], four[0]));
        dot[0] = _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
    }
    for (int r = 0; by4 < groups && r < R; r++)
        dot[r] += int4_rest_avx2(w + r * bytes + by4 * 32, x8 + by4 * INT4_GROUP, scale + r * groups + by4, xs + by4,
                                 xsum + by4, groups - by4);
}

static void int4_block_avx2(int64_t rows, const uint8_t *w, const uint16_t *scale, const int8_t *x8, const float *xs,
                            const int32_t *xsum, int64_t Kp, float dot[4]) {
    if (rows == 4) {
        int4_rows_avx2(4, w, scale, x8, xs, xsum, Kp, dot);
        return;
    }
    for (int64_t r = 0; r < rows; r++)  /* the last block's 1-3 rows */
        int4_rows_avx2(1, w + r * (Kp / 2), scale + r * (Kp / INT4_GROUP), x8, xs, xsum, Kp, dot + r);
}
#pragma GCC pop_options

static void int4_blocks(const void *ctx, int64_t first, int64_t end) {  /* blocks [first, end) of 4 rows */
    const Product *p = ctx;
    const uint8_t *w = p->w;
    const uint16_t *scale = p->scale;
    const int8_t *x8 = p->x8;
    const int32_t *xsum = p->xsum;
    const float *xs = p->xs, *bias = p->bias;
    float *y = p->y;
    const int64_t M = p->M, N = p->N, Kp = p->Kp, G = p->G, groups = Kp / G, stride = XGROUPS(groups);
    const int fast = avx2() && G == INT4_GROUP;
    for (int64_t blk = first; blk < end; blk++) {
        const int64_t n0 = blk * 4, rows = N - n0 < 4 ? N - n0 : 4;
        for (int64_t m = 0; m < M; m++) {  /* the block's 4 rows stay in the L1 cache for every input row */
            float dot[4];
            if (fast)
                int4_block_avx2(rows, w + n0 * (Kp / 2), scale + n0 * groups, x8 + m * Kp, xs + m * stride,
                                xsum + m * stride, Kp, dot);
            else
                for (int64_t r = 0; r < rows; r++)
                    dot[r] = int4_row_portable(w + (n0 + r) * (Kp / 2), scale + (n0 + r) * groups, x8 + m * Kp,
                                               xs + m * stride, Kp, G);
            for (int64_t r = 0; r < rows; r++) y[m * N + n0 + r] = dot[r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
}

void matvec_int4(const float *x, const uint8_t *w, const uint16_t *scale, const float *bias, float *y,
                 int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
    const int64_t Kp = (K + G - 1) / G * G, stride = XGROUPS(Kp / G);
    int8_t *x8 = malloc(M * Kp);
    float *xs = malloc(sizeof(float) * M * stride);
    int32_t *xsum = malloc(sizeof(int32_t) * M * stride);
    quantize_groups(x, x8, xs, xsum, M, K, Kp, G);
    const Product p = {.x8 = x8, .xs = xs, .xsum = xsum, .bias = bias, .w = w, .scale = scale, .y = y,
                       .M = M, .N = N, .Kp = Kp, .G = G};
    share(int4_blocks, &p, (N + 3) / 4, chunk_of(2 * Kp), N * K >= PARALLEL_MIN ? threads : 1);
    free(x8);
    free(xs);
    free(xsum);
}
/* ---- One decoding step: every block, the final norm and the head in one call ----
   M rows (sequences), each adding one token at its own position; keys and values go into the caller's KV
   cache (bfloat16, (layers, rows, kv_heads, max_len, head_dim) with the given layer and row strides: half the bytes
   of float32 to read at every step, which at 16 rows of ~100 positions are as many as gpt2-small's int8 weights). The
   Linear layers are packed bfloat16, int8 or int4 weights (`kind`); everything else is float32, computed as
   PyTorch's modules compute it: GPT-2's shape (LayerNorm, a position table, GELU) or Llama's (RMSNorm, rotary
   positions, a gated feed-forward, grouped key/value heads), with Qwen3's and Gemma 3's options (RMS-normalised
   queries and keys, sliding windows, norms after each sub-layer, scaled embeddings) and Qwen3-MoE's mixture of
   experts (each row through the experts its router chooses). */
enum { BF16, INT8, INT4 };
enum { GELU_TANH, GELU_ERF, SILU };
typedef struct { const void *w; const void *scale; const float *bias; int64_t n, k, kind, group; } Lin;
typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;  /* ln*_b NULL: no shift */
    const float *post1_w, *post1_b, *post2_w, *post2_b;  /* post*_w NULL: no norm after the sub-layer */
    const float *q_norm, *k_norm;                /* NULL: queries and keys not normalised */
    const float *inv_freq;                       /* (head_dim / 2) rotary frequencies; NULL: a position table */
    int64_t window;                              /* a query sees the last `window` positions; 0: all */
    Lin qkv[3]; int64_t n_qkv;                   /* one (q, k, v) product, or three */
    Lin att_out, fc, up, ff_out;                 /* up.w non-NULL: gated, act(fc x) * up x */
    int64_t n_experts, top_k, norm_topk;         /* n_experts 0: dense; else fc, up, ff_out stack the experts' */
    const float *router;                         /* (n_experts, emb_dim) float32: the router's weight */
} Block;
typedef struct {
    int64_t n_layers, emb_dim, n_heads, n_kv_heads, head_dim, hidden, vocab, act, rms;
    float eps, att_scale, emb_scale;
    const float *tok_emb, *pos_emb, *lnf_w, *lnf_b;  /* pos_emb NULL: rotary positions in the blocks */
    Lin head;
    const Block *blocks;
} Model;

static void linear(const Lin *l, const float *x, float *y, int64_t M, int threads) {
    if (l->kind == INT4) matvec_int4(x, l->w, l->scale, l->bias, y, M, l->n, l->k, l->group, threads);
    else if (l->kind == INT8) matvec_int8(x, l->w, l->scale, l->bias, y, M, l->n, l->k, threads);
    else matvec_bf16(x, l->w, NULL, l->bias, y, M, l->n, l->k, threads);
}

/* M rows of C: LayerNorm (mean removed, then shift b if any) or RMSNorm (`rms`: divided by the root mean square) */
static void norm(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t C, float eps, int rms) {
    for (int64_t m = 0; m < M; m++, x += C, y += C) {
        double mean = 0.0, var = 0.0;
        if (!rms) {
            for (int64_t c = 0; c < C; c++) mean += x[c];
            mean /= C;
        }
        for (int64_t c = 0; c < C; c++) var += (x[c] - mean) * (x[c] - mean);
        const float inv = (float)(1.0 / sqrt(var / C + eps));
        for (int64_t c = 0; c < C; c++) y[c] = (float)(x[c] - mean) * inv * w[c] + (b ? b[c] : 0.0f);
    }
}

typedef struct { const float *x, *w, *b; float *y; int64_t C; float eps; int rms; } Norm;

static void norm_rows(const void *ctx, int64_t first, int64_t end) {  /* rows [first, end) of a Norm */
    const Norm *n = ctx;
    norm(n->x + first * n->C, n->w, n->b, n->y + first * n->C, end - first, n->C, n->eps, n->rms);
}

/* The model's norm (md->rms, md->eps) of M rows of C, the rows shared among threads */
static void norms(const Model *md, const float *x, const float *w, const float *b, float *y, int64_t M, int threads) {
    const Norm n = {x, w, b, y, md->emb_dim, md->eps, (int)md->rms};
    share(norm_rows, &n, M, 1, SHARED_ROWS(M, n.C, 1) ? threads : 1);
}

/* 16 partial sums (the compiler keeps them in vector registers: float additions are not reordered for it) */
static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[16] = {0}, total = 0.0f;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    for (; i < n; i++) total += a[i] * b[i];
    for (int j = 0; j < 16; j++) total += acc[j];
    return total;
}

static inline void axpy(float a, const float *x, float *y, int64_t n) {  /* y += a * x over n floats */
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* One head's D channels at position p: RMS-normalised with weight w (if any), then turned by rotary positions
   (if any): pair (x_i, x_{i + D/2}) by the angle p * inv_freq[i], Llama's rotate-half pairing. */
static void head_positions(float *x, const float *w, const float *inv_freq, int64_t p, int64_t D, float eps) {
    if (w) norm(x, w, NULL, x, 1, D, eps, 1);
    if (!inv_freq) return;
    for (int64_t i = 0; i < D / 2; i++) {
        const float angle = (float)p * inv_freq[i], c = cosf(angle), s = sinf(angle);
        const float a = x[i], b = x[i + D / 2];
        x[i] = a * c - b * s;
        x[i + D / 2] = b * c + a * s;
    }
}

static inline float activation(int64_t act, float v) {
    if (act == SILU) return v / (1.0f + expf(-v));
    if (act == GELU_TANH)  /* 0.5 v (1 + tanh u) = v / (1 + exp(-2u)): one expf, where tanhf took a third of the time
                              of a 16-row gpt2-small step's int8 products (and 1 + tanh u lost digits for u << 0) */
        return v / (1.0f + expf(-1.5957691216057308f * (v + 0.044715f * v * v * v)));
    return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
}

/* x += the sub-layer's output `part`, normalised first where the block has a norm after it (Gemma 3) */
static void residual(const Model *md, float *x, float *part, const float *w, const float *b, int64_t M, int threads) {
    if (w) norms(md, part, w, b, part, M, threads);
    for (int64_t i = 0; i < M * md->emb_dim; i++) x[i] += part[i];
}

/* One block's attention, shared among threads by (row, query head) */
typedef struct {
    const Model *md; const Block *B; const float *qkv; const uint16_t *kc0, *vc0; float *ctx, *scores;
    const int64_t *pos;
    int64_t longest, row_stride, max_len;
} Attention;

/* AVX2 for a head's scores and weighted values where D is a multiple of 8: the portable loops add each position's 16
   partial sums one after another, and keep the weighted sum in memory. Here 8 positions' dot products are computed
   together (8 independent sums of D / 8 FMAs) and their lanes added in one transposing tree; the weighted sum stays in
   registers. Measured on an AVX2 CPU (2 threads, gpt2-small's 12 layers, a float32 cache then): one row at position
   900, 3.7 -> 2.4 ms a token; 16 rows at 150 ran at the memory's bandwidth either way (~8 ms), which the bfloat16
   cache then halved in bytes. Prefetching ahead did not help. */
#pragma GCC push_options
#pragma GCC target("avx2,fma")
/* [the sum of a[0]'s 8 lanes, ..., of a[7]'s], each as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) */
static inline __attribute__((always_inline)) __m256 lane_sums8_avx2(const __m256 a[8]) {
    const __m256 b0 = _mm256_hadd_ps(a[0], a[1]), b1 = _mm256_hadd_ps(a[2], a[3]);  /* pairs of lanes */
    const __m256 b2 = _mm256_hadd_ps(a[4], a[5]), b3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 c0 = _mm256_hadd_ps(b0, b1), c1 = _mm256_hadd_ps(b2, b3);  /* a[0..3]'s halves, a[4..7]'s halves */
    return _mm256_add_ps(_mm256_permute2f128_ps(c0, c1, 0x20), _mm256_permute2f128_ps(c0, c1, 0x31));
}

/* s[j] = (q . k_j) * scale for j in [first, last], k_j = kc + j * D (bfloat16); each position's sum in the same
   order whether it is one of 8 or computed alone (the same scores for a row however many rows the step has) */
static void scores_avx2(const float *q, const uint16_t *kc, int64_t first, int64_t last, int64_t D, float scale,
                        float *s) {
    int64_t j = first;
    for (; j + 8 <= last + 1; j += 8) {
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 qd = _mm256_loadu_ps(q + d);
            for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(bf16x8_avx2(kc + (j + i) * D + d), qd, acc[i]);
        }
        _mm256_storeu_ps(s + j, _mm256_mul_ps(lane_sums8_avx2(acc), _mm256_set1_ps(scale)));
    }
    for (; j <= last; j++) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(bf16x8_avx2(kc + j * D + d), _mm256_loadu_ps(q + d), acc);
        float l[8];
        _mm256_storeu_ps(l, acc);
        s[j] = (((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))) * scale;
    }
}

/* out[c0 .. c0 + 8 NV) = sum over j in [first, last] of p[j] * v_j, v_j = vc + j * D (bfloat16), added in order of j */
static inline __attribute__((always_inline)) void values_avx2(const int NV, const float *p, const uint16_t *vc,
                                                              int64_t first, int64_t last, int64_t D, int64_t c0,
                                                              float *out) {
    __m256 o[8];
    for (int i = 0; i < NV; i++) o[i] = _mm256_setzero_ps();
    for (int64_t j = first; j <= last; j++) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        for (int i = 0; i < NV; i++) o[i] = _mm256_fmadd_ps(pj, bf16x8_avx2(vc + j * D + c0 + 8 * i), o[i]);
    }
    for (int i = 0; i < NV; i++) _mm256_storeu_ps(out + c0 + 8 * i, o[i]);
}

static void weighted_values_avx2(const float *p, const uint16_t *vc, int64_t first, int64_t last, int64_t D,
                                 float *out) {
    int64_t c = 0;
    for (; c + 64 <= D; c += 64) values_avx2(8, p, vc, first, last, D, c, out);  /* 8 registers of sums */
    for (; c < D; c += 8) values_avx2(1, p, vc, first, last, D, c, out);
}
#pragma GCC pop_options

/* (row, query head) pairs [first, end): each attends to the positions its window sees, with its group's key/value head */
static CLONES void attention_heads(const void *work, int64_t first, int64_t end) {
    const Attention *a = work;
    const Model *md = a->md;
    const int64_t H = md->n_heads, KV = md->n_kv_heads, D = md->head_dim, QW = (H + 2 * KV) * D, G = H / KV;
    for (int64_t mh = first; mh < end; mh++) {
        const int64_t m = mh / H, hd = mh % H, p = a->pos[m], window = a->B->window;
        const int64_t first_j = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
        const uint16_t *kc = a->kc0 + m * a->row_stride + hd / G * a->max_len * D;
        const uint16_t *vc = a->vc0 + m * a->row_stride + hd / G * a->max_len * D;
        const float *q = a->qkv + m * QW + hd * D;
        float *s = a->scores + mh * a->longest, top = -INFINITY, sum = 0.0f;
        const int fast = D % 8 == 0 && avx2();
        float row[D];  /* the portable loops' key or value, widened to float32 */
        if (fast) scores_avx2(q, kc, first_j, p, D, md->att_scale, s);
        else
            for (int64_t j = first_j; j <= p; j++) s[j] = dot(q, widen(kc + j * D, row, D), D) * md->att_scale;
        for (int64_t j = first_j; j <= p; j++) top = s[j] > top ? s[j] : top;
        for (int64_t j = first_j; j <= p; j++) sum += (s[j] = expf(s[j] - top));
        for (int64_t j = first_j; j <= p; j++) s[j] /= sum;
        float *out = a->ctx + m * H * D + hd * D;
        if (fast) weighted_values_avx2(s, vc, first_j, p, D, out);
        else {
            memset(out, 0, sizeof(float) * D);
            for (int64_t j = first_j; j <= p; j++) axpy(s[j], widen(vc + j * D, row, D), out, D);
        }
    }
}

/* Block B's attention for M rows: q, k, v (M, QW) -> ctx (M, H * D), keys and values written at each row's position. */
static void attention(const Model *md, const Block *B, float *qkv, float *ctx, float *scores, const int64_t *pos,
                      int64_t M, int64_t longest, uint16_t *kc0, uint16_t *vc0, int64_t row_stride, int64_t max_len,
                      int threads) {
    const int64_t H = md->n_heads, KV = md->n_kv_heads, D = md->head_dim, QW = (H + 2 * KV) * D;
    for (int64_t mh = 0; mh < M * (H + KV); mh++) {  /* queries and keys: normalised, turned */
        const int64_t m = mh / (H + KV), hd = mh % (H + KV);
        head_positions(qkv + m * QW + hd * D, hd < H ? B->q_norm : B->k_norm, B->inv_freq, pos[m], D, md->eps);
    }
    for (int64_t mh = 0; mh < M * KV; mh++) {  /* the new key and value into the cache */
        const int64_t m = mh / KV, hd = mh % KV;
        narrow(qkv + m * QW + (H + hd) * D, kc0 + m * row_stride + (hd * max_len + pos[m]) * D, D);
        narrow(qkv + m * QW + (H + KV + hd) * D, vc0 + m * row_stride + (hd * max_len + pos[m]) * D, D);
    }
    const Attention a = {md, B, qkv, kc0, vc0, ctx, scores, pos, longest, row_stride, max_len};
    share(attention_heads, &a, M * H, 1, M * H * longest * D >= (1 << 16) ? threads : 1);
}

typedef struct { int64_t act; float *ff; const float *gate; } Activation;

static CLONES void activate(const void *work, int64_t first, int64_t end) {  /* ff = act(ff) (* gate), elements [first, end) */
    const Activation *a = work;
    for (int64_t i = first; i < end; i++) a->ff[i] = activation(a->act, a->ff[i]) * (a->gate ? a->gate[i] : 1.0f);
}

/* Block B's feed-forward for M rows: h (M, C) -> part (M, C), through ff (M, hidden) and gate (M, hidden) */
static void feed_forward(const Model *md, const Block *B, const float *h, float *ff, float *gate, float *part,
                         int64_t M, int threads) {
    const int64_t F = md->hidden;
    linear(&B->fc, h, ff, M, threads);
    if (B->up.w) linear(&B->up, h, gate, M, threads);
    const Activation a = {md->act, ff, B->up.w ? gate : NULL};
    share(activate, &a, M * F, 2048, M * F >= (1 << 14) ? threads : 1);
    linear(&B->ff_out, ff, part, M, threads);
}

/* Expert e's matrix of a projection that stacks every expert's (see quant.DecodeMoE): `l` describes one expert's
   (n, k) matrix at expert 0; each expert takes n rows padded to a multiple of 4 (a packed tile's first row). */
static Lin expert_lin(const Lin *l, int64_t e) {
    const int64_t first = (l->n + 3) / 4 * 4 * e;
    Lin s = *l;
    if (l->kind == INT4) {
        const int64_t Kp = (l->k + l->group - 1) / l->group * l->group;
        s.w = (const uint8_t *)l->w + first * (Kp / 2);
        s.scale = (const uint16_t *)l->scale + first * (Kp / l->group);
    } else {
        const int64_t K32 = (l->k + 31) / 32 * 32;
        s.w = (const uint8_t *)l->w + first * K32 * (l->kind == BF16 ? 2 : 1);
        if (l->kind == INT8) s.scale = (const float *)l->scale + first;
    }
    return s;
}

/* One row's routing, as moe.py's `route`: the router's float32 logits, their softmax, the top_k experts (the largest
   probabilities, the lowest index first among equal ones) into chosen, their probabilities (rescaled to sum to 1
   when norm_topk) into weight. probs: n_experts floats of scratch. */
static void route(const Block *B, const float *x, int64_t C, float *probs, int64_t *chosen, float *weight) {
    float top = -INFINITY, sum = 0.0f, total = 0.0f;
    for (int64_t e = 0; e < B->n_experts; e++) {
        probs[e] = dot(B->router + e * C, x, C);
        top = probs[e] > top ? probs[e] : top;
    }
    for (int64_t e = 0; e < B->n_experts; e++) sum += (probs[e] = expf(probs[e] - top));
    for (int64_t e = 0; e < B->n_experts; e++) probs[e] /= sum;
    for (int64_t j = 0; j < B->top_k; j++) {
        int64_t best = 0;
        for (int64_t e = 1; e < B->n_experts; e++) best = probs[e] > probs[best] ? e : best;  /* strict: the lowest */
        chosen[j] = best;
        total += (weight[j] = probs[best]);
        probs[best] = -1.0f;  /* below every probability: not chosen twice */
    }
    for (int64_t j = 0; B->norm_topk && j < B->top_k; j++) weight[j] /= total;
}

/* Block B's mixture of experts for M rows: h (M, C) -> part (M, C). Each row is routed on its own (rows of a batch may
   choose different experts); then each expert any row chose runs once, on the rows that chose it (gathered), and each
   row adds its experts' outputs times their weights in increasing expert order, as moe.py's index_add_ does. */
static void mixture(const Model *md, const Block *B, const float *h, float *part, int64_t M, int threads) {
    const int64_t C = md->emb_dim, E = B->n_experts, K = B->top_k, F = B->fc.n;
    int64_t *chosen = malloc(sizeof(int64_t) * M * K), *rows = malloc(sizeof(int64_t) * M);
    float *weight = malloc(sizeof(float) * M * K), *row_weight = malloc(sizeof(float) * M);
    float *probs = malloc(sizeof(float) * E);
    float *xin = malloc(sizeof(float) * M * C), *out = malloc(sizeof(float) * M * C);
    float *ff = malloc(sizeof(float) * M * F), *gate = malloc(sizeof(float) * M * F);
    for (int64_t m = 0; m < M; m++) route(B, h + m * C, C, probs, chosen + m * K, weight + m * K);
    memset(part, 0, sizeof(float) * M * C);
    for (int64_t e = 0; e < E; e++) {
        int64_t n = 0;
        for (int64_t i = 0; i < M * K; i++)
            if (chosen[i] == e) {
                rows[n] = i / K;
                row_weight[n] = weight[i];
                memcpy(xin + n * C, h + rows[n] * C, sizeof(float) * C);
                n++;
            }
        if (n == 0) continue;  /* an expert no row chose costs nothing */
        const Lin fc = expert_lin(&B->fc, e), up = expert_lin(&B->up, e), down = expert_lin(&B->ff_out, e);
        linear(&fc, xin, ff, n, threads);
        linear(&up, xin, gate, n, threads);
        for (int64_t i = 0; i < n * F; i++) ff[i] = activation(md->act, ff[i]) * gate[i];
        linear(&down, ff, out, n, threads);
        for (int64_t i = 0; i < n; i++) axpy(row_weight[i], out + i * C, part + rows[i] * C, C);
    }
    free(chosen); free(rows); free(weight); free(row_weight); free(probs); free(xin); free(out); free(ff); free(gate);
}

/* Returns 0, or 1 when a token id is outside the vocabulary, 2 when a position is outside the cache or the
   context (nothing is written then). */
CLONES int decode_step(const Model *md, const int64_t *ids, const int64_t *pos, int64_t M, uint16_t *k_cache, uint16_t *v_cache,
                int64_t layer_stride, int64_t row_stride, int64_t max_len, int64_t n_positions, float *logits,
                int threads) {
    const int64_t C = md->emb_dim, A = md->n_heads * md->head_dim, QW = A + 2 * md->n_kv_heads * md->head_dim;
    const int64_t F = md->hidden, big = C > A ? C : A;
    for (int64_t m = 0; m < M; m++) {
        if (ids[m] < 0 || ids[m] >= md->vocab) return 1;
        if (pos[m] < 0 || pos[m] >= max_len || pos[m] >= n_positions) return 2;
    }
    int64_t longest = 0;
    for (int64_t m = 0; m < M; m++) longest = pos[m] + 1 > longest ? pos[m] + 1 : longest;
    float *x = malloc(sizeof(float) * M * C), *h = malloc(sizeof(float) * M * C), *ctx = malloc(sizeof(float) * M * A);
    float *qkv = malloc(sizeof(float) * M * QW), *part = malloc(sizeof(float) * M * big);
    float *ff = malloc(sizeof(float) * M * F), *gate = malloc(sizeof(float) * M * F);
    float *scores = malloc(sizeof(float) * M * md->n_heads * longest);
    for (int64_t m = 0; m < M; m++)  /* token embeddings (scaled: Gemma), plus the position's (GPT-2) */
        for (int64_t c = 0; c < C; c++)
            x[m * C + c] = md->tok_emb[ids[m] * C + c] * md->emb_scale + (md->pos_emb ? md->pos_emb[pos[m] * C + c] : 0.0f);

    for (int64_t l = 0; l < md->n_layers; l++) {
        const Block *B = md->blocks + l;
        norms(md, x, B->ln1_w, B->ln1_b, h, M, threads);
        if (B->n_qkv == 1) {
            linear(&B->qkv[0], h, qkv, M, threads);  /* (M, QW): queries, keys, values */
        } else {
            for (int64_t j = 0, at = 0; j < 3; at += B->qkv[j].n, j++) {
                linear(&B->qkv[j], h, part, M, threads);
                for (int64_t m = 0; m < M; m++) memcpy(qkv + m * QW + at, part + m * B->qkv[j].n, sizeof(float) * B->qkv[j].n);
            }
        }
        attention(md, B, qkv, ctx, scores, pos, M, longest, k_cache + l * layer_stride, v_cache + l * layer_stride,
                  row_stride, max_len, threads);
        linear(&B->att_out, ctx, part, M, threads);
        residual(md, x, part, B->post1_w, B->post1_b, M, threads);

        norms(md, x, B->ln2_w, B->ln2_b, h, M, threads);
        if (B->n_experts) mixture(md, B, h, part, M, threads);
        else feed_forward(md, B, h, ff, gate, part, M, threads);
        residual(md, x, part, B->post2_w, B->post2_b, M, threads);
    }
    norms(md, x, md->lnf_w, md->lnf_b, h, M, threads);
    linear(&md->head, h, logits, M, threads);
    free(x); free(h); free(ctx); free(qkv); free(part); free(ff); free(gate); free(scores);
    return 0;
}
