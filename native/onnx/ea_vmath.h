/*
 * ea_vmath.h: vectorised (wasm SIMD128, 4 x f32) transcendental functions for the kernels,
 * and the in-place activation every family may apply to a float buffer.
 *
 * Accuracy is measured against float64 references over the whole float range that
 * matters (tests/test_convert_eltwise.py checks the kernels against onnxruntime):
 *   ea_v_exp      ~1-2 ulp (max relative error < 2.5e-7); denormal results kept; NaN -> NaN
 *   ea_v_expm1    ~2 ulp relative, also near 0 (no cancellation for |x| < ln2/2)
 *   ea_v_log      ~1 ulp (Cephes logf); denormals, 0, inf, negatives and NaN as libm
 *   ea_v_tanh     ~3 ulp relative (< 4e-7), exact sign and exact 0, +-1 beyond |x| >= 10
 *   ea_v_sigmoid  ~3 ulp relative (< 4e-7) where the result is a normal float
 *   ea_v_erf      < 2.5e-7 relative everywhere (~3 ulp)
 *   ea_v_gelu     ~3e-7 relative for x > -1.3; 3e-6 relative down to -5.55 (no cancellation), 0 below
 *   ea_v_gelu_tanh ~3 ulp relative (computed as x sigmoid(2u): no cancellation for x < 0)
 * No FMA is used (no relaxed SIMD): results are deterministic on every engine.
 * Only plain SIMD128 intrinsics; the functions are static inline, so a family that
 * includes this header pays nothing for what it does not use.
 */
#ifndef EA_VMATH_H
#define EA_VMATH_H

#include <math.h>
#include <stdint.h>
#include <wasm_simd128.h>

/* Always inlined: a call per vector (v128 arguments, constants re-materialised) costs more than the math. */
#define EA_VINLINE static inline __attribute__((always_inline))

/* Activation kinds of ea_activation_f32 (agent/convert/ops/unary.py ACTIVATION_KINDS must agree). */
enum {
  EA_ACT_NONE = 0,
  EA_ACT_RELU = 1,
  EA_ACT_LEAKY_RELU = 2,   /* alpha: slope for x < 0 */
  EA_ACT_CLIP = 3,         /* alpha: min, beta: max (min(max(x, alpha), beta)) */
  EA_ACT_SIGMOID = 4,
  EA_ACT_HARD_SIGMOID = 5, /* max(0, min(1, alpha * x + beta)) */
  EA_ACT_TANH = 6,
  EA_ACT_HARD_SWISH = 7,   /* x * max(0, min(1, x / 6 + 0.5)) */
  EA_ACT_ELU = 8,          /* alpha */
  EA_ACT_GELU = 9,         /* exact: 0.5 x (1 + erf(x / sqrt 2)) */
  EA_ACT_GELU_TANH = 10,   /* tanh approximation (Gelu approximate="tanh") */
  EA_ACT_SOFTPLUS = 11,    /* log(1 + exp(x)) */
  EA_ACT_SELU = 12,        /* alpha, beta = gamma */
  EA_ACT_COUNT = 13,
};

/* Apply activation `kind` to x[0..n) in place. Defined in ops_unary.c. Unknown kinds leave x as is. */
void ea_activation_f32(float *x, int32_t n, int32_t kind, float alpha, float beta);

/*
 * Clamp with NaN kept: pmin/pmax (one x86 instruction each, unlike the IEEE min/max that
 * f32x4.min/max are) return their first operand when the comparison fails, so a NaN x stays NaN.
 */
EA_VINLINE v128_t ea_v_clamp(v128_t x, float lo, float hi) {
  return wasm_f32x4_pmin(wasm_f32x4_pmax(x, wasm_f32x4_splat(lo)), wasm_f32x4_splat(hi));
}

/* p * 2^n for integral n in [-252, 254] given as i32 lanes, as two factors (each a normal float). */
EA_VINLINE v128_t ea_v_pow2_scale(v128_t p, v128_t n) {
  v128_t n1 = wasm_i32x4_shr(n, 1);
  v128_t n2 = wasm_i32x4_sub(n, n1);
  v128_t bias = wasm_i32x4_splat(127);
  v128_t s1 = wasm_i32x4_shl(wasm_i32x4_add(n1, bias), 23);
  v128_t s2 = wasm_i32x4_shl(wasm_i32x4_add(n2, bias), 23);
  return wasm_f32x4_mul(wasm_f32x4_mul(p, s1), s2);
}

/*
 * Shared range reduction of exp/expm1: x = n ln2 + r, |r| <= ln2/2 (Cody-Waite, two-part ln2),
 * q = e^r - 1 = r + r^2 P(r) (Cephes expf minimax polynomial, ~1 ulp on the reduced range).
 * n = round-to-nearest(x log2 e) by adding 1.5 * 2^23 (its low mantissa bits are then n as an
 * integer): cheaper than f32x4.nearest + trunc_sat on x86.
 */
EA_VINLINE v128_t ea_v_exp_reduce(v128_t x, v128_t *n_float, v128_t *n_int) {
  const v128_t magic = wasm_f32x4_splat(12582912.0f);
  x = ea_v_clamp(x, -104.0f, 88.8f); /* NaN stays NaN */
  v128_t t = wasm_f32x4_add(wasm_f32x4_mul(x, wasm_f32x4_splat(1.44269504088896341f)), magic);
  v128_t n = wasm_f32x4_sub(t, magic);
  v128_t r = wasm_f32x4_sub(x, wasm_f32x4_mul(n, wasm_f32x4_splat(0.693359375f)));
  r = wasm_f32x4_sub(r, wasm_f32x4_mul(n, wasm_f32x4_splat(-2.12194440e-4f)));
  v128_t p = wasm_f32x4_splat(1.9875691500e-4f);
  p = wasm_f32x4_add(wasm_f32x4_mul(p, r), wasm_f32x4_splat(1.3981999507e-3f));
  p = wasm_f32x4_add(wasm_f32x4_mul(p, r), wasm_f32x4_splat(8.3334519073e-3f));
  p = wasm_f32x4_add(wasm_f32x4_mul(p, r), wasm_f32x4_splat(4.1665795894e-2f));
  p = wasm_f32x4_add(wasm_f32x4_mul(p, r), wasm_f32x4_splat(1.6666665459e-1f));
  p = wasm_f32x4_add(wasm_f32x4_mul(p, r), wasm_f32x4_splat(5.0000001201e-1f));
  *n_float = n;
  *n_int = wasm_i32x4_sub(t, magic); /* the integer bits: t = magic + n exactly */
  return wasm_f32x4_add(wasm_f32x4_mul(wasm_f32x4_mul(r, r), p), r);
}

/* e^x. ~1-2 ulp; overflow -> +inf (x > 88.72), gradual underflow to 0 (x < -103.97); NaN -> NaN. */
EA_VINLINE v128_t ea_v_exp(v128_t x) {
  v128_t n, ni;
  v128_t q = ea_v_exp_reduce(x, &n, &ni);
  return ea_v_pow2_scale(wasm_f32x4_add(q, wasm_f32x4_splat(1.0f)), ni);
}

/* e^x - 1, accurate (~2 ulp relative) near 0 as well. */
EA_VINLINE v128_t ea_v_expm1(v128_t x) {
  v128_t n, ni;
  v128_t q = ea_v_exp_reduce(x, &n, &ni);
  v128_t big = wasm_f32x4_sub(ea_v_pow2_scale(wasm_f32x4_add(q, wasm_f32x4_splat(1.0f)), ni), wasm_f32x4_splat(1.0f));
  return wasm_v128_bitselect(q, big, wasm_f32x4_eq(n, wasm_f32x4_splat(0.0f)));
}

/*
 * log x (Cephes logf): x = m 2^e with m in [sqrt(1/2), sqrt 2), log(m) by a degree-9 polynomial
 * in m - 1, e ln2 in two parts. ~1 ulp; denormals scaled first; log 0 = -inf, log(x < 0) = NaN,
 * log inf = inf, NaN -> NaN.
 */
EA_VINLINE v128_t ea_v_log(v128_t x) {
  const v128_t one = wasm_f32x4_splat(1.0f);
  v128_t tiny = wasm_f32x4_lt(x, wasm_f32x4_splat(1.17549435e-38f)); /* denormal (or <= 0) */
  v128_t xs = wasm_v128_bitselect(wasm_f32x4_mul(x, wasm_f32x4_splat(8388608.0f)), x, tiny);
  v128_t e = wasm_i32x4_sub(wasm_u32x4_shr(xs, 23), wasm_i32x4_splat(126));
  e = wasm_v128_bitselect(wasm_i32x4_sub(e, wasm_i32x4_splat(23)), e, tiny);
  v128_t m = wasm_v128_or(wasm_v128_and(xs, wasm_i32x4_splat(0x007fffff)), wasm_i32x4_splat(0x3f000000)); /* [0.5, 1) */
  v128_t lo = wasm_f32x4_lt(m, wasm_f32x4_splat(0.707106781186547524f));
  v128_t ef = wasm_f32x4_convert_i32x4(wasm_v128_bitselect(wasm_i32x4_sub(e, wasm_i32x4_splat(1)), e, lo));
  v128_t f = wasm_f32x4_sub(wasm_v128_bitselect(wasm_f32x4_add(m, m), m, lo), one);
  v128_t z = wasm_f32x4_mul(f, f);
  v128_t y = wasm_f32x4_splat(7.0376836292e-2f);
  y = wasm_f32x4_add(wasm_f32x4_mul(y, f), wasm_f32x4_splat(-1.1514610310e-1f));
  y = wasm_f32x4_add(wasm_f32x4_mul(y, f), wasm_f32x4_splat(1.1676998740e-1f));
  y = wasm_f32x4_add(wasm_f32x4_mul(y, f), wasm_f32x4_splat(-1.2420140846e-1f));
  y = wasm_f32x4_add(wasm_f32x4_mul(y, f), wasm_f32x4_splat(1.4249322787e-1f));
  y = wasm_f32x4_add(wasm_f32x4_mul(y, f), wasm_f32x4_splat(-1.6668057665e-1f));
  y = wasm_f32x4_add(wasm_f32x4_mul(y, f), wasm_f32x4_splat(2.0000714765e-1f));
  y = wasm_f32x4_add(wasm_f32x4_mul(y, f), wasm_f32x4_splat(-2.4999993993e-1f));
  y = wasm_f32x4_add(wasm_f32x4_mul(y, f), wasm_f32x4_splat(3.3333331174e-1f));
  y = wasm_f32x4_mul(wasm_f32x4_mul(y, f), z);
  y = wasm_f32x4_add(y, wasm_f32x4_mul(ef, wasm_f32x4_splat(-2.12194440e-4f)));
  y = wasm_f32x4_sub(y, wasm_f32x4_mul(z, wasm_f32x4_splat(0.5f)));
  v128_t r = wasm_f32x4_add(wasm_f32x4_add(f, y), wasm_f32x4_mul(ef, wasm_f32x4_splat(0.693359375f)));
  /* Special values: 0 -> -inf, inf -> inf, x < 0 or NaN -> NaN. */
  r = wasm_v128_bitselect(wasm_f32x4_splat(-INFINITY), r, wasm_f32x4_eq(x, wasm_f32x4_splat(0.0f)));
  r = wasm_v128_bitselect(x, r, wasm_f32x4_eq(x, wasm_f32x4_splat(INFINITY)));
  return wasm_v128_bitselect(wasm_f32x4_splat(NAN), r, wasm_v128_not(wasm_f32x4_ge(x, wasm_f32x4_splat(0.0f))));
}

/* tanh x = sign(x) e / (e + 2), e = expm1(2|x|); |x| >= 10 gives +-1 exactly. ~3 ulp. */
EA_VINLINE v128_t ea_v_tanh(v128_t x) {
  v128_t sign = wasm_v128_and(x, wasm_i32x4_splat((int32_t)0x80000000u));
  v128_t a = wasm_f32x4_pmin(wasm_f32x4_abs(x), wasm_f32x4_splat(10.0f)); /* NaN stays NaN */
  v128_t e = ea_v_expm1(wasm_f32x4_add(a, a));
  v128_t t = wasm_f32x4_div(e, wasm_f32x4_add(e, wasm_f32x4_splat(2.0f)));
  return wasm_v128_or(t, sign);
}

/* 1 / (1 + e^-x). ~3 ulp where the result is normal; flushes to 0 below x = -88.7. */
EA_VINLINE v128_t ea_v_sigmoid(v128_t x) {
  v128_t e = ea_v_exp(wasm_f32x4_neg(x));
  return wasm_f32x4_div(wasm_f32x4_splat(1.0f), wasm_f32x4_add(wasm_f32x4_splat(1.0f), e));
}

/*
 * erf: |x| < 0.921875: x P(x^2) (degree-5 least-max fit); beyond: sign(x) (1 - erfc|x|), with
 * erfc t = exp(Q(t)) (degree-8 fit of log erfc on [0.921875, 3.925]; erf is +-1 in float beyond).
 * Measured: max relative error 2.5e-7 (~3 ulp), exact sign, erf(0) = 0, NaN -> NaN.
 */
#define EA_ERF_SPLIT 0.921875f
#define EA_ERF_HIGH 3.925f

EA_VINLINE v128_t ea_v_erf_small(v128_t x) { /* erf x for |x| < EA_ERF_SPLIT */
  v128_t z = wasm_f32x4_mul(x, x);
  v128_t p = wasm_f32x4_splat(-6.014832761e-04f);
  p = wasm_f32x4_add(wasm_f32x4_mul(p, z), wasm_f32x4_splat(4.998284858e-03f));
  p = wasm_f32x4_add(wasm_f32x4_mul(p, z), wasm_f32x4_splat(-2.677042596e-02f));
  p = wasm_f32x4_add(wasm_f32x4_mul(p, z), wasm_f32x4_splat(1.128193289e-01f));
  p = wasm_f32x4_add(wasm_f32x4_mul(p, z), wasm_f32x4_splat(-3.761250675e-01f));
  p = wasm_f32x4_add(wasm_f32x4_mul(p, z), wasm_f32x4_splat(1.128379107e+00f));
  return wasm_f32x4_mul(p, x);
}

EA_VINLINE v128_t ea_v_erfc_big(v128_t a) { /* erfc a for EA_ERF_SPLIT <= a (clamped at EA_ERF_HIGH), ~3e-6 rel */
  v128_t t = wasm_f32x4_pmin(a, wasm_f32x4_splat(EA_ERF_HIGH)); /* NaN stays NaN */
  v128_t q = wasm_f32x4_splat(1.630994007e-06f);
  q = wasm_f32x4_add(wasm_f32x4_mul(q, t), wasm_f32x4_splat(-4.590017124e-05f));
  q = wasm_f32x4_add(wasm_f32x4_mul(q, t), wasm_f32x4_splat(5.951652420e-04f));
  q = wasm_f32x4_add(wasm_f32x4_mul(q, t), wasm_f32x4_splat(-4.750441294e-03f));
  q = wasm_f32x4_add(wasm_f32x4_mul(q, t), wasm_f32x4_splat(2.639090456e-02f));
  q = wasm_f32x4_add(wasm_f32x4_mul(q, t), wasm_f32x4_splat(-1.100193858e-01f));
  q = wasm_f32x4_add(wasm_f32x4_mul(q, t), wasm_f32x4_splat(-6.318985224e-01f));
  q = wasm_f32x4_add(wasm_f32x4_mul(q, t), wasm_f32x4_splat(-1.130186319e+00f));
  q = wasm_f32x4_add(wasm_f32x4_mul(q, t), wasm_f32x4_splat(3.073642729e-04f));
  return ea_v_exp(q);
}

EA_VINLINE v128_t ea_v_erf(v128_t x) {
  v128_t a = wasm_f32x4_abs(x);
  v128_t sign = wasm_v128_and(x, wasm_i32x4_splat((int32_t)0x80000000u));
  v128_t big = wasm_v128_or(wasm_f32x4_sub(wasm_f32x4_splat(1.0f), ea_v_erfc_big(a)), sign);
  return wasm_v128_bitselect(ea_v_erf_small(x), big, wasm_f32x4_lt(a, wasm_f32x4_splat(EA_ERF_SPLIT)));
}

/*
 * Gelu, exact form: x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2, with Phi = erfc(|t|) / 2 for
 * t = x / sqrt 2 <= -0.921875 (no cancellation): ~3e-7 relative for x > -1.3, ~3e-6 relative
 * down to x = -5.55; 0 below (where |Gelu| < 2.3e-8).
 */
EA_VINLINE v128_t ea_v_gelu(v128_t x) {
  const v128_t half = wasm_f32x4_splat(0.5f);
  v128_t t = wasm_f32x4_mul(x, wasm_f32x4_splat(0.70710678118654752f));
  v128_t a = wasm_f32x4_abs(t);
  v128_t tail = wasm_f32x4_mul(half, ea_v_erfc_big(a)); /* erfc(|t|) / 2 */
  v128_t small = wasm_f32x4_add(half, wasm_f32x4_mul(half, ea_v_erf_small(t)));
  v128_t neg = wasm_v128_andnot(tail, wasm_f32x4_gt(a, wasm_f32x4_splat(EA_ERF_HIGH)));
  v128_t big = wasm_v128_bitselect(wasm_f32x4_sub(wasm_f32x4_splat(1.0f), tail), neg, wasm_f32x4_gt(t, wasm_f32x4_splat(0.0f)));
  v128_t phi = wasm_v128_bitselect(small, big, wasm_f32x4_lt(a, wasm_f32x4_splat(EA_ERF_SPLIT)));
  return wasm_f32x4_mul(x, phi);
}

/* Gelu, tanh form: 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): no cancellation. */
EA_VINLINE v128_t ea_v_gelu_tanh(v128_t x) {
  v128_t x3 = wasm_f32x4_mul(wasm_f32x4_mul(x, x), x);
  v128_t u = wasm_f32x4_mul(wasm_f32x4_add(x, wasm_f32x4_mul(x3, wasm_f32x4_splat(0.044715f))),
                            wasm_f32x4_splat(0.79788456080286536f));
  return wasm_f32x4_mul(x, ea_v_sigmoid(wasm_f32x4_add(u, u)));
}

/* Load up to 4 floats (n in 1..3 for a tail) into a vector, zero-padded; store back n lanes. */
EA_VINLINE v128_t ea_v_load_partial(const float *p, int32_t n) {
  float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int32_t i = 0; i < n; i++) t[i] = p[i];
  return wasm_v128_load(t);
}

EA_VINLINE void ea_v_store_partial(float *p, v128_t v, int32_t n) {
  float t[4];
  wasm_v128_store(t, v);
  for (int32_t i = 0; i < n; i++) p[i] = t[i];
}

#endif /* EA_VMATH_H */
