/*
 * ops_linear.c: the "linear" op family (plan.h): Gemm and MatMul over ea_gemm.
 * Opcodes and attribute layouts: agent/convert/ops/linear.py.
 */
#include "ea_gemm.h"

enum {
  OP_GEMM = 0,   /* Y[M,N] = act(alpha * op(A) . B + bias + beta * C): the rows of A (any rank) times B */
  OP_MATMUL = 1, /* numpy matmul of two tensors (batch dimensions broadcast) + bias, act */
};

/* B layouts of OP_GEMM. */
enum {
  B_PACKED = 0,     /* constant, packed in NR-column panels at build time */
  B_ROWMAJOR = 1,   /* [K,N] */
  B_TRANSPOSED = 2, /* [N,K] */
};

/*
 * OP_GEMM
 *   in:  A; B (see b_layout); bias (N padded to NR panels, or absent); C (or absent)
 *   out: Y [M,N]
 *   iattr: K, N, transA, b_layout, c_rows (C's rows: 1 or M), c_cols (1 or N), act_mode, act_kind
 *   fattr: alpha, beta, act lo, hi, slope, alpha, beta
 * A is [M,K] (rows of any leading shape: M = count/K), or [K,M] with transA.
 */
static int32_t op_gemm(const ea_op_t *op) {
  const ea_tensor_t *a = op->in[0], *b = op->in[1], *bias = op->in[2], *cm = op->in[3];
  ea_tensor_t *y = op->out[0];
  const int32_t K = op->iattr[0], N = op->iattr[1], trans_a = op->iattr[2], b_layout = op->iattr[3];
  const int32_t c_rows = op->iattr[4], c_cols = op->iattr[5];
  if (K < 0 || N <= 0) return EA_ERR_INTERNAL;
  const int32_t M = K ? a->count / K : y->count / N;
  if ((int64_t)M * N != y->count) return EA_ERR_INTERNAL;
  ea_gemm_t g = {0};
  ea_act_read(op, 6, 2, &g.act);
  g.M = M;
  g.N = N;
  g.K = K;
  g.alpha = op->fattr[0];
  float beta = op->fattr[1];
  float *ap = ea_scratch((uint32_t)ea_gemm_packed_a_size(M, K) * 4u);
  if (!ap) return EA_ERR_NOMEM;
  if (trans_a) ea_gemm_pack_a(a->data, M, K, 1, M, ap);
  else ea_gemm_pack_a(a->data, M, K, K, 1, ap);
  g.a = ap;
  if (b_layout != B_PACKED) {
    g.work = ea_scratch((uint32_t)ea_gemm_work_floats(N) * 4u);
    if (!g.work) return EA_ERR_NOMEM;
  }
  switch (b_layout) {
  case B_PACKED:
    g.b = b->data;
    break;
  case B_ROWMAJOR:
    g.b = b->data;
    g.ldb = N;
    break;
  case B_TRANSPOSED: {
    float *bt = ea_scratch((uint32_t)K * (uint32_t)N * 4u);
    if (!bt) return EA_ERR_NOMEM;
    const float *src = b->data;
    for (int32_t n = 0; n < N; n++)
      for (int32_t k = 0; k < K; k++) bt[(size_t)k * N + n] = src[(size_t)n * K + k];
    g.b = bt;
    g.ldb = N;
    break;
  }
  default: return EA_ERR_INTERNAL;
  }
  g.c = y->data;
  g.ldc = N;
  g.bias_col = bias ? bias->data : 0;
  if (cm) {
    /* beta * C broadcast to [M,N], written into Y and added to the product. */
    const float *cv = cm->data;
    float *yv = y->data;
    for (int32_t i = 0; i < M; i++)
      for (int32_t j = 0; j < N; j++)
        yv[(size_t)i * N + j] = beta * cv[(size_t)(c_rows > 1 ? i : 0) * c_cols + (c_cols > 1 ? j : 0)];
    g.init = yv;
    g.ld_init = N;
  }
  return ea_gemm(&g);
}

/*
 * OP_MATMUL
 *   in:  A, B, bias (N padded to NR panels, or absent)
 *   out: Y
 *   iattr: a_1d, b_1d, act_mode, act_kind
 *   fattr: act lo, hi, slope, alpha, beta
 * Batch dimensions (all but the last two) broadcast numpy-style; 1-D operands as numpy.
 */
static int32_t op_matmul(const ea_op_t *op) {
  const ea_tensor_t *a = op->in[0], *b = op->in[1], *bias = op->in[2];
  ea_tensor_t *y = op->out[0];
  const int32_t a_1d = op->iattr[0], b_1d = op->iattr[1];
  ea_gemm_t g = {0};
  ea_act_read(op, 2, 0, &g.act);
  const int32_t ra = a->rank, rb = b->rank;
  const int32_t M = a_1d ? 1 : a->dims[ra - 2], K = a->dims[ra - 1];
  const int32_t N = b_1d ? 1 : b->dims[rb - 1];
  if ((b_1d ? b->dims[0] : b->dims[rb - 2]) != K) return EA_ERR_INTERNAL;
  /* Batch shapes, right-aligned to the output's. */
  const int32_t ab = a_1d ? 0 : ra - 2, bb = b_1d ? 0 : rb - 2;
  const int32_t nb = y->rank - (a_1d ? 0 : 1) - (b_1d ? 0 : 1);
  if (nb < 0 || nb > EA_MAX_RANK || ab > nb || bb > nb) return EA_ERR_INTERNAL;
  int32_t dims[EA_MAX_RANK], sa[EA_MAX_RANK], sb[EA_MAX_RANK];
  int32_t batches = 1;
  {
    int32_t stride_a = M * K, stride_b = K * N;
    for (int32_t d = nb - 1; d >= 0; d--) {
      int32_t ia = d - (nb - ab), ib = d - (nb - bb);
      int32_t da = ia >= 0 ? a->dims[ia] : 1, db = ib >= 0 ? b->dims[ib] : 1;
      dims[d] = y->dims[d];
      sa[d] = da == 1 ? 0 : stride_a;
      sb[d] = db == 1 ? 0 : stride_b;
      stride_a *= da;
      stride_b *= db;
      batches *= dims[d];
    }
  }
  g.alpha = 1.0f;
  g.bias_col = bias ? bias->data : 0;
  g.b = b->data;
  g.ldb = N;
  g.K = K;
  g.N = N;
  g.ldc = N;
  /* B shared by every batch and A contiguous: one GEMM over all of A's rows. */
  int b_shared = 1, a_dense = 1;
  {
    int32_t expect = M * K;
    for (int32_t d = nb - 1; d >= 0; d--) {
      if (sb[d] != 0 && dims[d] != 1) b_shared = 0;
      if (dims[d] != 1) {
        if (sa[d] != expect) a_dense = 0;
        expect *= dims[d];
      }
    }
  }
  int32_t rows = (b_shared && a_dense) ? M * batches : M;
  int32_t runs = (b_shared && a_dense) ? 1 : batches;
  float *ap = ea_scratch((uint32_t)ea_gemm_packed_a_size(rows, K) * 4u);
  g.work = ea_scratch((uint32_t)ea_gemm_work_floats(N) * 4u);
  if (!ap || !g.work) return EA_ERR_NOMEM;
  g.M = rows;
  g.a = ap;
  int32_t idx[EA_MAX_RANK] = {0};
  for (int32_t run = 0; run < runs; run++) {
    int64_t off_a = 0, off_b = 0;
    for (int32_t d = 0; d < nb; d++) {
      off_a += (int64_t)idx[d] * sa[d];
      off_b += (int64_t)idx[d] * sb[d];
    }
    ea_gemm_pack_a((const float *)a->data + off_a, rows, K, K, 1, ap);
    g.b = (const float *)b->data + off_b;
    g.c = (float *)y->data + (size_t)run * M * N;
    int32_t status = ea_gemm(&g);
    if (status != EA_OK) return status;
    for (int32_t d = nb - 1; d >= 0; d--) {
      if (++idx[d] < dims[d]) break;
      idx[d] = 0;
    }
  }
  return EA_OK;
}

ea_kernel_fn ea_ops_linear(uint32_t opcode) {
  switch (opcode & 63u) {
  case OP_GEMM: return op_gemm;
  case OP_MATMUL: return op_matmul;
  default: return 0;
  }
}
