/*
 * ops_unary.c: the "unary" op family (plan.h): elementwise one-input ops and activations.
 * Opcodes: agent/convert/ops/unary.py (OPCODES), the U_* enum below.
 *
 * Every opcode goes to one kernel (op_unary) that picks the loop from the opcode and the
 * element types. Float loops are SIMD128 where the function vectorises (ea_vmath.h for
 * exp/tanh/sigmoid/erf); the rarer transcendental functions use wasi-libc's libm.
 * Attributes: fattr[0], fattr[1] = alpha/beta-like parameters (Clip min/max for floats,
 * LeakyRelu/Elu/Celu/ThresholdedRelu alpha, Selu alpha/gamma, HardSigmoid alpha/beta,
 * Shrink bias/lambd); iattr for integer Clip bounds (two int64 as lo/hi word pairs) and
 * IsInf's detect_negative/detect_positive. Clip's optional in[1]/in[2] are bounds computed at
 * run time (one element of the input's type); they replace the attribute bound.
 * Also defines ea_activation_f32 (declared in ea_vmath.h) for other families' epilogues.
 */
#include "ea_math.h"
#include "ea_vmath.h"

enum {
  U_SQRT = 0,
  U_EXP = 1,
  U_LOG = 2,
  U_NEG = 3,
  U_ABS = 4,
  U_CLIP = 5,
  U_RELU = 6,
  U_LEAKY_RELU = 7,
  U_ELU = 8,
  U_SELU = 9,
  U_SIGMOID = 10,
  U_HARD_SIGMOID = 11,
  U_HARD_SWISH = 12,
  U_TANH = 13,
  U_ERF = 14,
  U_GELU = 15,
  U_GELU_TANH = 16,
  U_RECIPROCAL = 17,
  U_FLOOR = 18,
  U_CEIL = 19,
  U_NOT = 20,
  U_SOFTPLUS = 21,
  U_SOFTSIGN = 22,
  U_SIGN = 23,
  U_ROUND = 24,
  U_ISNAN = 25,
  U_ISINF = 26,
  U_CELU = 27,
  U_THRESHOLDED_RELU = 28,
  U_SHRINK = 29,
  U_MISH = 30,
  U_SIN = 31,
  U_COS = 32,
  U_TAN = 33,
  U_ASIN = 34,
  U_ACOS = 35,
  U_ATAN = 36,
  U_SINH = 37,
  U_COSH = 38,
  U_ASINH = 39,
  U_ACOSH = 40,
  U_ATANH = 41,
  U_BITWISE_NOT = 42,
  U_COUNT = 43,
};

/* y[i] = VEXPR(v) over 4-lane vectors, tail through a padded vector (same results as the body). */
#define VLOOP(VEXPR)                                                                    \
  do {                                                                                  \
    int32_t i_ = 0;                                                                     \
    for (; i_ + 4 <= n; i_ += 4) {                                                      \
      v128_t v = wasm_v128_load(x + i_);                                                \
      wasm_v128_store(y + i_, (VEXPR));                                                 \
    }                                                                                   \
    if (i_ < n) {                                                                       \
      v128_t v = ea_v_load_partial(x + i_, n - i_);                                     \
      ea_v_store_partial(y + i_, (VEXPR), n - i_);                                      \
    }                                                                                   \
  } while (0)

#define SLOOP(SEXPR)                                                                    \
  do {                                                                                  \
    for (int32_t i_ = 0; i_ < n; i_++) {                                                \
      float v = x[i_];                                                                  \
      y[i_] = (SEXPR);                                                                  \
    }                                                                                   \
  } while (0)

static float softplus1(float v) { return v > 0.0f ? v + log1pf(expf(-v)) : log1pf(expf(v)); }

/* y = f(x) for float32; x may equal y (in place). Returns 0 for a code without a float form. */
static int32_t unary_f32(int32_t code, const float *x, float *y, int32_t n, float alpha, float beta) {
  const v128_t zero = wasm_f32x4_splat(0.0f), one = wasm_f32x4_splat(1.0f);
  const v128_t va = wasm_f32x4_splat(alpha), vb = wasm_f32x4_splat(beta);
  switch (code) {
  case U_SQRT: VLOOP(wasm_f32x4_sqrt(v)); return 1;
  case U_EXP: VLOOP(ea_v_exp(v)); return 1;
  case U_LOG: VLOOP(ea_v_log(v)); return 1;
  case U_NEG: VLOOP(wasm_f32x4_neg(v)); return 1;
  case U_ABS: VLOOP(wasm_f32x4_abs(v)); return 1;
  /* pmin/pmax (single x86 instructions) with v first: a NaN input stays NaN. */
  case U_CLIP: VLOOP(wasm_f32x4_pmin(wasm_f32x4_pmax(v, va), vb)); return 1;
  case U_RELU: VLOOP(wasm_f32x4_pmax(v, zero)); return 1;
  case U_LEAKY_RELU: VLOOP(wasm_v128_bitselect(wasm_f32x4_mul(v, va), v, wasm_f32x4_lt(v, zero))); return 1;
  case U_ELU: VLOOP(wasm_v128_bitselect(v, wasm_f32x4_mul(va, ea_v_expm1(v)), wasm_f32x4_gt(v, zero))); return 1;
  case U_SELU: /* alpha, beta = gamma */
    VLOOP(wasm_f32x4_mul(vb, wasm_v128_bitselect(v, wasm_f32x4_mul(va, ea_v_expm1(v)), wasm_f32x4_gt(v, zero))));
    return 1;
  case U_SIGMOID: VLOOP(ea_v_sigmoid(v)); return 1;
  case U_HARD_SIGMOID: VLOOP(wasm_f32x4_pmax(wasm_f32x4_pmin(wasm_f32x4_add(wasm_f32x4_mul(v, va), vb), one), zero)); return 1;
  case U_HARD_SWISH: {
    const v128_t sixth = wasm_f32x4_splat(1.0f / 6.0f), half = wasm_f32x4_splat(0.5f);
    VLOOP(wasm_f32x4_mul(v, wasm_f32x4_pmax(wasm_f32x4_pmin(wasm_f32x4_add(wasm_f32x4_mul(v, sixth), half), one), zero)));
    return 1;
  }
  case U_TANH: VLOOP(ea_v_tanh(v)); return 1;
  case U_ERF: VLOOP(ea_v_erf(v)); return 1;
  case U_GELU: VLOOP(ea_v_gelu(v)); return 1;
  case U_GELU_TANH: VLOOP(ea_v_gelu_tanh(v)); return 1;
  case U_RECIPROCAL: VLOOP(wasm_f32x4_div(one, v)); return 1;
  case U_FLOOR: VLOOP(wasm_f32x4_floor(v)); return 1;
  case U_CEIL: VLOOP(wasm_f32x4_ceil(v)); return 1;
  case U_SOFTPLUS: SLOOP(softplus1(v)); return 1;
  case U_SOFTSIGN: VLOOP(wasm_f32x4_div(v, wasm_f32x4_add(one, wasm_f32x4_abs(v)))); return 1;
  case U_SIGN: SLOOP(v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : v)); return 1; /* +-0 and NaN as they are */
  case U_ROUND: VLOOP(wasm_f32x4_nearest(v)); return 1;               /* half to even */
  case U_CELU: /* max(0, x) + min(0, alpha (exp(x / alpha) - 1)) */
    VLOOP(wasm_v128_bitselect(v, wasm_f32x4_mul(va, ea_v_expm1(wasm_f32x4_div(v, va))), wasm_f32x4_gt(v, zero)));
    return 1;
  case U_THRESHOLDED_RELU: VLOOP(wasm_v128_and(v, wasm_f32x4_gt(v, va))); return 1;
  case U_SHRINK: /* alpha = bias, beta = lambd */
    SLOOP(v < -beta ? v + alpha : (v > beta ? v - alpha : 0.0f));
    return 1;
  case U_MISH: SLOOP(v * tanhf(softplus1(v))); return 1;
  case U_SIN: SLOOP(sinf(v)); return 1;
  case U_COS: SLOOP(cosf(v)); return 1;
  case U_TAN: SLOOP(tanf(v)); return 1;
  case U_ASIN: SLOOP(asinf(v)); return 1;
  case U_ACOS: SLOOP(acosf(v)); return 1;
  case U_ATAN: SLOOP(atanf(v)); return 1;
  case U_SINH: SLOOP(sinhf(v)); return 1;
  case U_COSH: SLOOP(coshf(v)); return 1;
  case U_ASINH: SLOOP(asinhf(v)); return 1;
  case U_ACOSH: SLOOP(acoshf(v)); return 1;
  case U_ATANH: SLOOP(atanhf(v)); return 1;
  default: return 0;
  }
}

/* Activation kinds (ea_vmath.h) -> unary codes. */
static const int8_t act_code[EA_ACT_COUNT] = {
    [EA_ACT_NONE] = -1,
    [EA_ACT_RELU] = U_RELU,
    [EA_ACT_LEAKY_RELU] = U_LEAKY_RELU,
    [EA_ACT_CLIP] = U_CLIP,
    [EA_ACT_SIGMOID] = U_SIGMOID,
    [EA_ACT_HARD_SIGMOID] = U_HARD_SIGMOID,
    [EA_ACT_TANH] = U_TANH,
    [EA_ACT_HARD_SWISH] = U_HARD_SWISH,
    [EA_ACT_ELU] = U_ELU,
    [EA_ACT_GELU] = U_GELU,
    [EA_ACT_GELU_TANH] = U_GELU_TANH,
    [EA_ACT_SOFTPLUS] = U_SOFTPLUS,
    [EA_ACT_SELU] = U_SELU,
};

void ea_activation_f32(float *x, int32_t n, int32_t kind, float alpha, float beta) {
  if (kind <= 0 || kind >= EA_ACT_COUNT || n <= 0) return;
  unary_f32(act_code[kind], x, x, n, alpha, beta);
}

/* Integer ops, in unsigned arithmetic where signed overflow would be undefined (Abs/Neg of the minimum wrap). */
#define INT_LOOPS(T, U)                                                                                   \
  static int32_t unary_##T(int32_t code, const T *x, T *y, int32_t n, int64_t lo, int64_t hi) {            \
    switch (code) {                                                                                       \
    case U_NEG:                                                                                           \
      for (int32_t i = 0; i < n; i++) y[i] = (T)(U)(0u - (U)x[i]);                                        \
      return 1;                                                                                           \
    case U_ABS:                                                                                           \
      for (int32_t i = 0; i < n; i++) y[i] = x[i] < 0 ? (T)(U)(0u - (U)x[i]) : x[i];                      \
      return 1;                                                                                           \
    case U_RELU:                                                                                          \
      for (int32_t i = 0; i < n; i++) y[i] = x[i] < 0 ? 0 : x[i];                                         \
      return 1;                                                                                           \
    case U_SIGN:                                                                                          \
      for (int32_t i = 0; i < n; i++) y[i] = (T)((x[i] > 0) - (x[i] < 0));                                \
      return 1;                                                                                           \
    case U_BITWISE_NOT:                                                                                   \
      for (int32_t i = 0; i < n; i++) y[i] = (T)(U)~(U)x[i];                                              \
      return 1;                                                                                           \
    case U_CLIP:                                                                                          \
      for (int32_t i = 0; i < n; i++) {                                                                   \
        int64_t v = (int64_t)x[i];                                                                        \
        v = v < lo ? lo : v;                                                                              \
        y[i] = (T)(v > hi ? hi : v);                                                                      \
      }                                                                                                   \
      return 1;                                                                                           \
    default: return 0;                                                                                    \
    }                                                                                                     \
  }

INT_LOOPS(int8_t, uint8_t)
INT_LOOPS(uint8_t, uint8_t)
INT_LOOPS(int32_t, uint32_t)
INT_LOOPS(int64_t, uint64_t)

static int64_t iattr64(const ea_op_t *op, int32_t k) {
  if (op->n_i < 2 * k + 2) return 0;
  return (int64_t)((uint64_t)(uint32_t)op->iattr[2 * k] | (uint64_t)(uint32_t)op->iattr[2 * k + 1] << 32);
}

static int32_t op_unary(const ea_op_t *op) {
  const ea_tensor_t *xt = op->in[0];
  ea_tensor_t *yt = op->out[0];
  int32_t code = (int32_t)(op->opcode & 63u);
  int32_t n = xt->count;
  if (n != yt->count) return EA_ERR_INTERNAL;
  if (n == 0) return EA_OK;
  float alpha = op->n_f > 0 ? op->fattr[0] : 0.0f, beta = op->n_f > 1 ? op->fattr[1] : 0.0f;
  if (yt->dtype == EA_BOOL) {
    uint8_t *y = yt->data;
    if (code == U_NOT && xt->dtype == EA_BOOL) {
      const uint8_t *x = xt->data;
      for (int32_t i = 0; i < n; i++) y[i] = x[i] == 0;
      return EA_OK;
    }
    if (xt->dtype != EA_F32) return EA_ERR_INTERNAL;
    const float *x = xt->data;
    if (code == U_ISNAN) {
      for (int32_t i = 0; i < n; i++) y[i] = x[i] != x[i];
      return EA_OK;
    }
    if (code == U_ISINF) {
      int32_t neg = op->n_i > 0 ? op->iattr[0] : 1, pos = op->n_i > 1 ? op->iattr[1] : 1;
      for (int32_t i = 0; i < n; i++) y[i] = (pos && x[i] == INFINITY) || (neg && x[i] == -INFINITY);
      return EA_OK;
    }
    return EA_ERR_INTERNAL;
  }
  if (xt->dtype != yt->dtype) return EA_ERR_INTERNAL;
  int32_t ok;
  int64_t lo = iattr64(op, 0), hi = iattr64(op, 1);
  if (code == U_CLIP) {
    for (int32_t k = 1; k <= 2 && k < op->n_in; k++) {
      const ea_tensor_t *bt = op->in[k];
      if (!bt) continue;
      if (bt->count < 1 || bt->dtype != xt->dtype) return EA_ERR_INTERNAL;
      int64_t iv = 0;
      float fv = 0.0f;
      switch (bt->dtype) {
      case EA_F32: fv = *(const float *)bt->data; break;
      case EA_I8: iv = *(const int8_t *)bt->data; break;
      case EA_U8: iv = *(const uint8_t *)bt->data; break;
      case EA_I32: iv = *(const int32_t *)bt->data; break;
      case EA_I64: iv = *(const int64_t *)bt->data; break;
      default: return EA_ERR_INTERNAL;
      }
      if (k == 1) {
        alpha = fv;
        lo = iv;
      } else {
        beta = fv;
        hi = iv;
      }
    }
  }
  switch (xt->dtype) {
  case EA_F32: ok = unary_f32(code, xt->data, yt->data, n, alpha, beta); break;
  case EA_I8: ok = unary_int8_t(code, xt->data, yt->data, n, lo, hi); break;
  case EA_U8: ok = unary_uint8_t(code, xt->data, yt->data, n, lo, hi); break;
  case EA_I32: ok = unary_int32_t(code, xt->data, yt->data, n, lo, hi); break;
  case EA_I64: ok = unary_int64_t(code, xt->data, yt->data, n, lo, hi); break;
  default: ok = 0;
  }
  return ok ? EA_OK : EA_ERR_INTERNAL;
}

ea_kernel_fn ea_ops_unary(uint32_t opcode) {
  return (opcode & 63u) < U_COUNT ? op_unary : 0;
}
