/*
 * ea_gemm.h: the single-precision GEMM shared by ops_linear.c (Gemm, MatMul) and
 * ops_conv.c (Conv through im2col), with a fused epilogue (bias, activation).
 *
 *   C[M,N] = act(A[M,K] . B[K,N] + init)
 *
 * A is always packed: cut into blocks of EA_KC values of k, and within a block
 * into panels of EA_MR rows, each panel [kc][EA_MR] (zero rows past M). Block p
 * starts at p*EA_KC*Mp (Mp = M rounded up to EA_MR), its panel i at i*kc*EA_MR
 * from there, so that the panels one K block multiplies are adjacent in memory.
 * Constant operands are packed at build time by agent/convert/ops/linear.py and
 * conv.py (pack_a, pack_b: keep EA_MR, EA_NR and EA_KC in step); run-time
 * operands by ea_gemm_pack_a.
 *
 * B is packed the same way in panels of EA_NR columns (zero columns past N):
 * at build time (constant weights), or by ea_gemm itself one block at a time
 * from a row-major matrix (row stride ldb: a run-time MatMul operand, a 1x1
 * Conv's input) or through a pack_b callback (a Conv's im2col).
 */
#ifndef EA_GEMM_H
#define EA_GEMM_H

#include <wasm_simd128.h>

#include "ea_math.h"

#define EA_MR 4
#define EA_NR 16
#define EA_KC 256 /* agent/convert/ops/linear.py KC */

/* a * b + c on f32x4: relaxed SIMD's relaxed_madd (fused where the hardware has FMA). clang 14
   knows it only as __builtin_wasm_fma_f32x4 under a pre-standard opcode, which the build
   rewrites after linking (native/onnx/relaxed_fixup.py). */
#define EA_MADD(a, b, c) ((v128_t)__builtin_wasm_fma_f32x4((__f32x4)(a), (__f32x4)(b), (__f32x4)(c)))

/* Epilogue modes (iattr "act_mode" of Gemm/MatMul/Conv ops). */
enum {
  EA_EPI_NONE = 0,
  EA_EPI_CLAMP = 1,    /* min(max(x, lo), hi): Relu, Clip, Relu6 */
  EA_EPI_LEAKY = 2,    /* max(x, slope*x), 0 <= slope <= 1: LeakyRelu */
  EA_EPI_EXTERNAL = 3, /* ea_activation_f32(kind, alpha, beta) on each finished row */
};

typedef struct {
  int32_t mode;
  int32_t kind; /* EA_EPI_EXTERNAL: ea_activation_f32's kind */
  float lo, hi, slope;
  float alpha, beta; /* EA_EPI_EXTERNAL */
} ea_act_t;

/* Writes B[k0..k0+kc) x [j0..j0+nc) into dst as panels of EA_NR columns, each [kc][EA_NR]
   (panel p at p*kc*EA_NR), zero past nc in the last one. */
typedef void (*ea_pack_b_fn)(const void *ctx, int32_t k0, int32_t kc, int32_t j0, int32_t nc, float *dst);

typedef struct {
  int32_t M, N, K;
  const float *a; /* packed A (see above) */
  /* B, one of: packed at build time (b, ldb == 0); a row-major matrix (b, row stride
     ldb > 0); produced block by block by pack_b(b_ctx, ...) (a Conv's im2col). The last two
     are packed into work (ea_gemm_work_floats(N) floats; when NULL, a buffer ea_gemm
     allocates once and keeps). */
  const float *b;
  int32_t ldb;
  ea_pack_b_fn pack_b;
  const void *b_ctx;
  float *work;
  float *c;
  int32_t ldc;
  /* Added to the product (any of them): bias per row (M values), bias per column
     (ceil(N/NR)*NR values: zero-padded), a matrix (init, row stride ld_init: C's own
     contents, a residual connection). */
  const float *bias_row;
  const float *bias_col;
  const float *init;
  int32_t ld_init;
  float alpha; /* scales A.B (not the initial value) */
  ea_act_t act;
} ea_gemm_t;

/* C = act(alpha * A.B + init). Returns EA_OK or EA_ERR_NOMEM. */
int32_t ea_gemm(const ea_gemm_t *g);

/* Column block of the GEMM (B is packed NC columns at a time). */
#ifndef EA_NC
#define EA_NC 512
#endif

/* Floats of ea_gemm's work buffer for a B of N columns packed at run time. */
static inline int32_t ea_gemm_work_floats(int32_t N) {
  int32_t n = N < EA_NC ? N : EA_NC;
  return EA_KC * ((n + EA_NR - 1) / EA_NR * EA_NR);
}

/* A row-major B for ea_gemm_pack_rows. */
typedef struct {
  const float *data;
  int32_t ld;
} ea_rows_t;
void ea_gemm_pack_rows(const void *ctx, int32_t k0, int32_t kc, int32_t j0, int32_t nc, float *dst);

/* Packs rows [0,M) of A(i,k) = src[i*rs + k*cs] at dst (ea_gemm_packed_a_size floats). */
void ea_gemm_pack_a(const float *src, int32_t M, int32_t K, int32_t rs, int32_t cs, float *dst);

/* Floats of packed A for M rows. */
static inline int32_t ea_gemm_packed_a_size(int32_t M, int32_t K) { return (M + EA_MR - 1) / EA_MR * EA_MR * K; }

/* Reads the epilogue from iattr[at..at+2) (mode, kind) and fattr[ft..ft+5) (lo, hi, slope, alpha, beta). */
static inline void ea_act_read(const ea_op_t *op, int32_t at, int32_t ft, ea_act_t *act) {
  act->mode = op->iattr[at];
  act->kind = op->iattr[at + 1];
  act->lo = op->fattr[ft];
  act->hi = op->fattr[ft + 1];
  act->slope = op->fattr[ft + 2];
  act->alpha = op->fattr[ft + 3];
  act->beta = op->fattr[ft + 4];
}

/* Applies an epilogue to n contiguous floats (paths that do not go through ea_gemm). */
void ea_act_apply(const ea_act_t *act, float *x, int32_t n);

#endif /* EA_GEMM_H */
