/*
 * ea_gemm.c: the SGEMM behind Gemm, MatMul and Conv (see ea_gemm.h).
 *
 * GotoBLAS/BLIS structure: the N, K and M dimensions are cut into blocks that
 * fit the caches (NC, KC, MC), and a register-blocked micro-kernel computes an
 * EA_MR x EA_NR (4 x 16) tile of C in f32x4 accumulators over one K block. A
 * comes in packed panels (its EA_MR values for one k are adjacent: one load);
 * B in packed panels too: packed at build time (constant weights), or block by
 * block as the GEMM goes (a run-time matrix, a Conv's im2col written straight in
 * panel order). Contiguous panels keep the micro-kernel's loads in few pages
 * and cache sets. A last panel narrower than EA_NR runs a 4-, 8- or 12-wide tile.
 *
 * Multiply-add: relaxed SIMD's f32x4.relaxed_madd (fused on hardware with FMA).
 * clang 14 knows it only under its pre-standard name and opcode
 * (__builtin_wasm_fma_f32x4, 0xfd 0xaf), which the build rewrites to the
 * standard opcode after linking (native/onnx/relaxed_fixup.py); the operands
 * are then a * b + c.
 */
#include "ea_gemm.h"

void *ea_alloc(uint32_t nbytes); /* interp.c: permanent heap memory */

#ifndef EA_GEMM_FMA
#define EA_GEMM_FMA 1
#endif

#if EA_GEMM_FMA
#define MADD(a, b, c) EA_MADD(a, b, c)
#else
#define MADD(a, b, c) wasm_f32x4_add(wasm_f32x4_mul((a), (b)), (c))
#endif

#define KC EA_KC
#ifndef EA_MC
#define EA_MC 128
#endif
#define MC EA_MC
#define NC EA_NC

/* ea_activation_f32 (ops_unary.c) applies the activations the micro-kernel does not inline. */
#include "ea_vmath.h"

#if EA_MR != 4 || EA_NR != 16
#error "the micro-kernel is written for a 4 x 16 tile"
#endif

/* acc[r][0..W) += a[r] * b[0..4W) for one k: av holds the 4 values of A for this k (broadcast
   lane by lane: one load and a shuffle each, cheaper than a splat load per row once compiled),
   b the 4W values of B. */
#define EA_STEP(av, b)                                                                       \
  do {                                                                                       \
    v128_t b_[4];                                                                            \
    for (int v = 0; v < W; v++) b_[v] = wasm_v128_load((b) + 4 * v);                         \
    if (R > 0) {                                                                             \
      v128_t s_ = wasm_i32x4_shuffle(av, av, 0, 0, 0, 0);                                    \
      for (int v = 0; v < W; v++) acc[0][v] = MADD(s_, b_[v], acc[0][v]);                    \
    }                                                                                        \
    if (R > 1) {                                                                             \
      v128_t s_ = wasm_i32x4_shuffle(av, av, 1, 1, 1, 1);                                    \
      for (int v = 0; v < W; v++) acc[1][v] = MADD(s_, b_[v], acc[1][v]);                    \
    }                                                                                        \
    if (R > 2) {                                                                             \
      v128_t s_ = wasm_i32x4_shuffle(av, av, 2, 2, 2, 2);                                    \
      for (int v = 0; v < W; v++) acc[2][v] = MADD(s_, b_[v], acc[2][v]);                    \
    }                                                                                        \
    if (R > 3) {                                                                             \
      v128_t s_ = wasm_i32x4_shuffle(av, av, 3, 3, 3, 3);                                    \
      for (int v = 0; v < W; v++) acc[3][v] = MADD(s_, b_[v], acc[3][v]);                    \
    }                                                                                        \
  } while (0)

/*
 * One R x 4W tile over kc values of k: c = act(alpha * a.b + src + bias_r + bias_c), each of
 * src, bias_r, bias_c optional (NULL). R (rows, 1..4) and W (f32x4 columns, 1, 2 or 4) are
 * constants at every call site, so the accumulators are SSA values.
 *
 * Tuned for what wasmtime (Cranelift) makes of it, measured: the k loop is unrolled by two,
 * not more. Cranelift schedules pure operations (shuffles, multiply-adds) by demand from the
 * loop's back edge, one accumulator chain after the other, so deeper unrolling keeps every
 * loaded operand of the body alive at once and spills; and with epoch interruption on, the
 * accumulators go through the stack at every loop head (the epoch check's slow path is a
 * call), which a 2-deep body and a 4 x 16 tile amortise best.
 */
static inline __attribute__((always_inline)) void tile(const int R, const int W, int32_t kc, const float *restrict a,
                                                        const float *restrict b, float *c, int32_t ldc,
                                                        const float *src, int32_t lds, const float *bias_r,
                                                        const float *bias_c, float alpha, const ea_act_t *act,
                                                        int last) {
  v128_t acc[4][4];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < W; v++) acc[r][v] = wasm_f32x4_const_splat(0.0f);
  int32_t k = 0;
  for (; k + 2 <= kc; k += 2) {
    v128_t a0 = wasm_v128_load(a), a1 = wasm_v128_load(a + 4);
    EA_STEP(a0, b);
    EA_STEP(a1, b + EA_NR);
    a += 8;
    b += 2 * EA_NR;
  }
  if (k < kc) {
    v128_t a0 = wasm_v128_load(a);
    EA_STEP(a0, b);
  }
  if (alpha != 1.0f) {
    v128_t s = wasm_f32x4_splat(alpha);
    for (int r = 0; r < R; r++)
      for (int v = 0; v < W; v++) acc[r][v] = wasm_f32x4_mul(acc[r][v], s);
  }
  if (src)
    for (int r = 0; r < R; r++)
      for (int v = 0; v < W; v++) acc[r][v] = wasm_f32x4_add(acc[r][v], wasm_v128_load(src + r * lds + 4 * v));
  if (bias_r)
    for (int r = 0; r < R; r++) {
      v128_t s = wasm_v128_load32_splat(bias_r + r);
      for (int v = 0; v < W; v++) acc[r][v] = wasm_f32x4_add(acc[r][v], s);
    }
  if (bias_c)
    for (int v = 0; v < W; v++) {
      v128_t s = wasm_v128_load(bias_c + 4 * v);
      for (int r = 0; r < R; r++) acc[r][v] = wasm_f32x4_add(acc[r][v], s);
    }
  if (last) {
    if (act->mode == EA_EPI_CLAMP) {
      v128_t lo = wasm_f32x4_splat(act->lo), hi = wasm_f32x4_splat(act->hi);
      for (int r = 0; r < R; r++)
        for (int v = 0; v < W; v++) acc[r][v] = wasm_f32x4_pmin(wasm_f32x4_pmax(acc[r][v], lo), hi);
    } else if (act->mode == EA_EPI_LEAKY) {
      v128_t s = wasm_f32x4_splat(act->slope);
      for (int r = 0; r < R; r++)
        for (int v = 0; v < W; v++) acc[r][v] = wasm_f32x4_pmax(wasm_f32x4_mul(acc[r][v], s), acc[r][v]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < W; v++) wasm_v128_store(c + r * ldc + 4 * v, acc[r][v]);
}

static void tile_any(int32_t rows, int W, int32_t kc, const float *a, const float *b, float *c,
                     int32_t ldc, const float *src, int32_t lds, const float *bias_r, const float *bias_c, float alpha,
                     const ea_act_t *act, int last) {
#define EA_TILE(R, W) tile(R, W, kc, a, b, c, ldc, src, lds, bias_r, bias_c, alpha, act, last)
#define EA_TILES(W)                                                                          \
  switch (rows) {                                                                            \
  case 1: EA_TILE(1, W); break;                                                              \
  case 2: EA_TILE(2, W); break;                                                              \
  case 3: EA_TILE(3, W); break;                                                              \
  default: EA_TILE(4, W); break;                                                             \
  }
  switch (W) {
  case 1: EA_TILES(1); break;
  case 2: EA_TILES(2); break;
  case 3: EA_TILES(3); break;
  default: EA_TILES(4); break;
  }
#undef EA_TILES
#undef EA_TILE
}

/* C and init tiles for partial tiles. */
static float edge_c[EA_MR * EA_NR] __attribute__((aligned(16)));
static float edge_s[EA_MR * EA_NR] __attribute__((aligned(16)));

void ea_act_apply(const ea_act_t *act, float *x, int32_t n) {
  int32_t i = 0;
  switch (act->mode) {
  case EA_EPI_CLAMP: {
    v128_t lo = wasm_f32x4_splat(act->lo), hi = wasm_f32x4_splat(act->hi);
    for (; i + 4 <= n; i += 4) wasm_v128_store(x + i, wasm_f32x4_pmin(wasm_f32x4_pmax(wasm_v128_load(x + i), lo), hi));
    for (; i < n; i++) {
      float v = x[i] < act->lo ? act->lo : x[i];
      x[i] = act->hi < v ? act->hi : v;
    }
    break;
  }
  case EA_EPI_LEAKY: {
    v128_t s = wasm_f32x4_splat(act->slope);
    for (; i + 4 <= n; i += 4) {
      v128_t v = wasm_v128_load(x + i);
      wasm_v128_store(x + i, wasm_f32x4_pmax(wasm_f32x4_mul(v, s), v));
    }
    for (; i < n; i++) x[i] = x[i] * act->slope > x[i] ? x[i] * act->slope : x[i];
    break;
  }
  case EA_EPI_EXTERNAL: ea_activation_f32(x, n, act->kind, act->alpha, act->beta); break;
  default: break;
  }
}

void ea_gemm_pack_a(const float *src, int32_t M, int32_t K, int32_t rs, int32_t cs, float *dst) {
  const int32_t Mp = (M + EA_MR - 1) / EA_MR * EA_MR;
  for (int32_t k0 = 0; k0 < K; k0 += KC) {
    const int32_t kc = EA_MIN(KC, K - k0);
    for (int32_t i0 = 0; i0 < M; i0 += EA_MR) {
      const int32_t rows = EA_MIN(EA_MR, M - i0);
      float *d = dst + (size_t)k0 * Mp + (size_t)i0 * kc;
      const float *s0 = src + (size_t)i0 * rs + (size_t)k0 * cs;
      if (cs == 1 && rows == EA_MR) {
        for (int32_t k = 0; k < kc; k++)
          for (int32_t r = 0; r < EA_MR; r++) d[k * EA_MR + r] = s0[(size_t)r * rs + k];
        continue;
      }
      for (int32_t k = 0; k < kc; k++)
        for (int32_t r = 0; r < EA_MR; r++) d[k * EA_MR + r] = r < rows ? s0[(size_t)r * rs + (size_t)k * cs] : 0.0f;
    }
  }
}

void ea_gemm_pack_rows(const void *ctx, int32_t k0, int32_t kc, int32_t j0, int32_t nc, float *dst) {
  const ea_rows_t *rows = ctx;
  const int32_t ld = rows->ld;
  for (int32_t p = 0; p * EA_NR < nc; p++) {
    const int32_t nv = EA_MIN(EA_NR, nc - p * EA_NR);
    const float *src = rows->data + (size_t)k0 * ld + j0 + p * EA_NR;
    float *d = dst + (size_t)p * kc * EA_NR;
    if (nv == EA_NR) {
      for (int32_t k = 0; k < kc; k++) {
        const float *s = src + (size_t)k * ld;
        for (int32_t v = 0; v < EA_NR; v += 4) wasm_v128_store(d + k * EA_NR + v, wasm_v128_load(s + v));
      }
    } else {
      for (int32_t k = 0; k < kc; k++)
        for (int32_t t = 0; t < EA_NR; t++) d[k * EA_NR + t] = t < nv ? src[(size_t)k * ld + t] : 0.0f;
    }
  }
}

int32_t ea_gemm(const ea_gemm_t *g) {
  const int32_t M = g->M, N = g->N, K = g->K;
  if (M <= 0 || N <= 0) return EA_OK;
  if (K <= 0) {
    /* Empty sum: C = act(init). */
    for (int32_t i = 0; i < M; i++) {
      float *row = g->c + (size_t)i * g->ldc;
      for (int32_t j = 0; j < N; j++)
        row[j] = (g->init ? g->init[(size_t)i * g->ld_init + j] : 0.0f) + (g->bias_row ? g->bias_row[i] : 0.0f) +
                 (g->bias_col ? g->bias_col[j] : 0.0f);
      ea_act_apply(&g->act, row, N);
    }
    return EA_OK;
  }
  const int32_t Mp = (M + EA_MR - 1) / EA_MR * EA_MR, Np = (N + EA_NR - 1) / EA_NR * EA_NR;
  ea_pack_b_fn pack_b = g->pack_b;
  const void *b_ctx = g->b_ctx;
  ea_rows_t rows;
  if (!pack_b && g->ldb > 0) {
    rows.data = g->b;
    rows.ld = g->ldb;
    pack_b = ea_gemm_pack_rows;
    b_ctx = &rows;
  }
  float *work = g->work;
  if (pack_b && !work) {
    static float *kept;
    if (!kept) kept = ea_alloc((uint32_t)ea_gemm_work_floats(EA_NC) * 4u);
    if (!kept) return EA_ERR_NOMEM;
    work = kept;
  }
  for (int32_t jc = 0; jc < N; jc += NC) {
    const int32_t nc = EA_MIN(NC, N - jc);
    for (int32_t pc = 0; pc < K; pc += KC) {
      const int32_t kc = EA_MIN(KC, K - pc);
      const int first = pc == 0, last = pc + kc == K;
      /* This block's B panels: packed at build time, or now. */
      const float *bblock;
      if (pack_b) {
        pack_b(b_ctx, pc, kc, jc, nc, work);
        bblock = work;
      } else {
        bblock = g->b + (size_t)pc * Np + (size_t)jc * kc;
      }
      for (int32_t ic = 0; ic < M; ic += MC) {
        const int32_t mc = EA_MIN(MC, M - ic);
        for (int32_t jr = 0; jr < nc; jr += EA_NR) {
          const int32_t j = jc + jr, nv = EA_MIN(EA_NR, nc - jr);
          const int W = (nv + 3) / 4;
          const float *bp = bblock + (size_t)jr * kc;
          const float *bias_c = first && g->bias_col ? g->bias_col + j : 0;
          for (int32_t ir = 0; ir < mc; ir += EA_MR) {
            const int32_t i = ic + ir, mv = EA_MIN(EA_MR, M - i);
            const float *ap = g->a + (size_t)pc * Mp + (size_t)i * kc;
            const float *bias_r = first && g->bias_row ? g->bias_row + i : 0;
            float *cp = g->c + (size_t)i * g->ldc + j;
            const float *src = 0;
            int32_t lds = 0;
            if (!first) {
              src = cp;
              lds = g->ldc;
            } else if (g->init) {
              src = g->init + (size_t)i * g->ld_init + j;
              lds = g->ld_init;
            }
            if (nv == 4 * W) {
              tile_any(mv, W, kc, ap, bp, cp, g->ldc, src, lds, bias_r, bias_c, g->alpha, &g->act, last);
            } else {
              if (src) {
                for (int32_t r = 0; r < mv; r++)
                  for (int32_t t = 0; t < nv; t++) edge_s[r * EA_NR + t] = src[(size_t)r * lds + t];
                src = edge_s;
                lds = EA_NR;
              }
              tile_any(mv, W, kc, ap, bp, edge_c, EA_NR, src, lds, bias_r, bias_c, g->alpha, &g->act, last);
              for (int32_t r = 0; r < mv; r++)
                for (int32_t t = 0; t < nv; t++) cp[(size_t)r * g->ldc + t] = edge_c[r * EA_NR + t];
            }
          }
        }
        if (last && g->act.mode == EA_EPI_EXTERNAL)
          for (int32_t i = ic; i < ic + mc; i++) ea_act_apply(&g->act, g->c + (size_t)i * g->ldc + jc, nc);
      }
    }
  }
  return EA_OK;
}
