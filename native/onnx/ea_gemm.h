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
 * B is either packed the same way in panels of EA_NR columns (zero columns past
 * N) or a plain row-major matrix (row stride ldb): a Conv's input or im2col
 * buffer, a run-time MatMul operand.
 */
#ifndef EA_GEMM_H
#define EA_GEMM_H

#include <wasm_simd128.h>

#include "ea_math.h"

#define EA_MR 4
#define EA_NR 16
#define EA_KC 256

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

typedef struct {
  int32_t M, N, K;
  const float *a; /* packed A (see above) */
  /* B: packed panels (b_packed) or row-major with row stride ldb. */
  const float *b;
  int32_t b_packed;
  int32_t ldb;
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

/* C = act(alpha * A.B + init). Returns EA_OK or EA_ERR_NOMEM (scratch). */
int32_t ea_gemm(const ea_gemm_t *g);

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
