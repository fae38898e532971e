/*
 * ops_quant.c: family 8, quantized (uint8/int8) ops. Opcodes and input layouts:
 * agent/convert/ops/quant.py.
 *
 * Arithmetic follows onnxruntime's CPU kernels (MLAS) so that results agree
 * bit for bit, or within one step of the output's quantization where
 * onnxruntime itself has several code paths:
 *   quantize      q = sat(round_even(x / scale) + zp)  (a division, clamped in float first)
 *   requantize    q = sat(round_even(float(acc + bias) * scale) + zp), scale = (xs * ws) / ys in float32
 *   dynamic       scale = (max(x, 0) - min(x, 0)) / 255, zp = round_even(clamp(-min / scale, 0, 255))
 *
 * Integer products: both operands are widened to int16 with their zero point
 * subtracted (-255..255), and multiplied with i32x4.dot_i16x8_s (pairs of
 * products summed into int32 lanes, exact). The matrix kernel (gemm_pairs)
 * keeps one operand in rows (S: K contiguous, read as 32-bit pairs and
 * splatted) and the other packed as pairs along K (V: [K/2][Np][2], Np a
 * multiple of 8), so a 4x8 tile of int32 accumulators needs no horizontal
 * sums. MatMul: S = A (rows), V = B (packed at build time when constant).
 * Conv: S = weights (rows = output channels), V = im2col of the input, written
 * straight into the pair layout from a zero-padded int16 copy of the image;
 * the result is then NCHW already.
 */
#include <wasm_simd128.h>

#include "ea_math.h"

enum {
  OP_QUANTIZE = 0,   /* in: x f32, scale f32[1|C], zp u8/i8[1|C]?; iattr: axis (-1: per tensor) */
  OP_DEQUANTIZE = 1, /* in: x u8/i8/i32, scale, zp?; iattr: axis */
  OP_DYNQUANT = 2,   /* DynamicQuantizeLinear over the whole tensor; out: y u8, scale f32, zp u8 */
  OP_QMATMUL = 3,    /* MatMulInteger, QLinearMatMul, QGemm, MatMulIntegerToFloat, DynamicQuantizeMatMul */
  OP_QCONV = 4,      /* ConvInteger, QLinearConv, dynamic quantized Conv */
  OP_QADD = 5,       /* QLinearAdd: in a, as, azp, b, bs, bzp, cs, czp */
  OP_QMUL = 6,       /* QLinearMul: same inputs */
  OP_QGAP = 7,       /* QLinearGlobalAveragePool: in x, xs, xzp, ys, yzp; iattr channels_last */
  OP_QSOFTMAX = 8,   /* QLinearSoftmax: in x, table f32[256], ys, yzp; iattr axis, coerce_2d */
  OP_LUT = 9,        /* y = table[x]: in x, table u8[256] */
  OP_QCONCAT = 10,   /* QLinearConcat: in (x_i, table_i | absent)...; iattr axis */
};

/* Epilogue of QMATMUL / QCONV (iattr[0]). */
enum {
  EPI_INT32 = 0,   /* out int32 = acc */
  EPI_REQUANT = 1, /* out u8/i8 = sat(round(float(acc + bias) * (xs * ws / ys)) + yzp) */
  EPI_FLOAT = 2,   /* out f32 = float(acc + bias) * (alpha * xs * ws) + fbias */
  EPI_DYNAMIC = 3, /* input f32 quantized per unit here; out f32 = float(acc) * (xs * ws) + fbias */
};

/* QMATMUL iattr layout. */
enum { MM_MODE, MM_B_PACKED, MM_RELU, MM_TRANS_B, MM_K, MM_N, MM_UNIT, MM_COUNT };
/* QCONV iattr layout. */
enum { CV_MODE, CV_W_PACKED, CV_RELU, CV_GROUP, CV_KH, CV_KW, CV_SH, CV_SW, CV_DH, CV_DW, CV_PT, CV_PL, CV_PB, CV_PR, CV_COUNT };
/* Inputs of QMATMUL and QCONV. */
enum { IN_X, IN_XS, IN_XZP, IN_W, IN_WS, IN_WZP, IN_BIAS, IN_YS, IN_YZP };

#define MM_ROWS 64        /* rows of A widened per block (agent/convert/ops/quant.py: MM_ROWS) */
#define CONV_VBUDGET 131072 /* bytes of im2col pairs per block (quant.py: CONV_VBUDGET) */

/* x + MAGIC leaves round_even(x) in the low mantissa bits for |x| < 2^22 (MLAS_ROUNDING_BIAS_MAGIC). */
#define MAGIC 12582912.0f
#define MAGIC_BITS 0x4B400000

static inline int32_t round_up(int32_t x, int32_t m) { return (x + m - 1) / m * m; }
static inline int32_t qmin_of(int32_t dtype) { return dtype == EA_I8 ? -128 : 0; }
static inline int32_t qmax_of(int32_t dtype) { return dtype == EA_I8 ? 127 : 255; }

/* Element i of a zero point (0 when absent; element 0 of a one-element tensor). */
static int32_t int_at(const ea_tensor_t *t, int32_t i) {
  if (!t) return 0;
  if (t->count == 1) i = 0;
  switch (t->dtype) {
  case EA_U8: return ((const uint8_t *)t->data)[i];
  case EA_I8: return ((const int8_t *)t->data)[i];
  case EA_I32: return ((const int32_t *)t->data)[i];
  default: return 0;
  }
}

static float float_at(const ea_tensor_t *t, int32_t i) {
  if (!t) return 1.0f;
  if (t->count == 1) i = 0;
  return ((const float *)t->data)[i];
}

/* round_even(clamp(f, lo, hi)); NaN gives lo, as MLAS's max/min/cvtps sequence does. */
static inline int32_t qround(float f, float lo, float hi) {
  f = lo < f ? f : lo;
  f = f < hi ? f : hi;
  return (int32_t)rintf(f);
}

/* Vector qround plus a zero point: zbias = MAGIC_BITS - zp. */
static inline v128_t vqround(v128_t f, v128_t lo, v128_t hi, v128_t zbias) {
  f = wasm_f32x4_pmax(lo, f);
  f = wasm_f32x4_pmin(hi, f);
  return wasm_i32x4_sub(wasm_f32x4_add(f, wasm_f32x4_splat(MAGIC)), zbias);
}

/* 16 int32 lanes (already in range) to 16 bytes. */
static inline v128_t pack16(v128_t a, v128_t b, v128_t c, v128_t d, int32_t sgn) {
  v128_t lo = wasm_i16x8_narrow_i32x4(a, b), hi = wasm_i16x8_narrow_i32x4(c, d);
  return sgn ? wasm_i8x16_narrow_i16x8(lo, hi) : wasm_u8x16_narrow_i16x8(lo, hi);
}

static inline void store4_q8(void *dst, v128_t q, int32_t sgn) {
  v128_t h = wasm_i16x8_narrow_i32x4(q, q);
  v128_t b = sgn ? wasm_i8x16_narrow_i16x8(h, h) : wasm_u8x16_narrow_i16x8(h, h);
  wasm_v128_store32_lane(dst, b, 0);
}

/* ---- QuantizeLinear / DequantizeLinear ------------------------------------ */

static void quantize_run(const float *x, uint8_t *y, int32_t n, float s, int32_t zp, int32_t dtype) {
  const int32_t sgn = dtype == EA_I8;
  const float lo = (float)(qmin_of(dtype) - zp), hi = (float)(qmax_of(dtype) - zp);
  const v128_t vs = wasm_f32x4_splat(s), vlo = wasm_f32x4_splat(lo), vhi = wasm_f32x4_splat(hi);
  const v128_t vz = wasm_i32x4_splat(MAGIC_BITS - zp);
  int32_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v128_t q0 = vqround(wasm_f32x4_div(wasm_v128_load(x + i), vs), vlo, vhi, vz);
    v128_t q1 = vqround(wasm_f32x4_div(wasm_v128_load(x + i + 4), vs), vlo, vhi, vz);
    v128_t q2 = vqround(wasm_f32x4_div(wasm_v128_load(x + i + 8), vs), vlo, vhi, vz);
    v128_t q3 = vqround(wasm_f32x4_div(wasm_v128_load(x + i + 12), vs), vlo, vhi, vz);
    wasm_v128_store(y + i, pack16(q0, q1, q2, q3, sgn));
  }
  for (; i < n; i++) y[i] = (uint8_t)(qround(x[i] / s, lo, hi) + zp);
}

/* Outer/channel/inner split of a tensor around `axis` (-1: one channel). */
static void axis_split(const ea_tensor_t *t, int32_t axis, int32_t *outer, int32_t *ch, int32_t *inner) {
  *outer = 1;
  *ch = 1;
  *inner = 1;
  if (axis < 0 || axis >= t->rank) {
    *inner = t->count;
    return;
  }
  for (int32_t i = 0; i < axis; i++) *outer *= t->dims[i];
  *ch = t->dims[axis];
  for (int32_t i = axis + 1; i < t->rank; i++) *inner *= t->dims[i];
}

static int32_t op_quantize(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0], *s = op->in[1], *z = op->in[2];
  ea_tensor_t *y = op->out[0];
  if (x->dtype != EA_F32 || (y->dtype != EA_U8 && y->dtype != EA_I8) || x->count != y->count) return EA_ERR_INTERNAL;
  int32_t outer, ch, inner;
  axis_split(x, s->count > 1 ? op->iattr[0] : -1, &outer, &ch, &inner);
  if (s->count > 1 && s->count != ch) return EA_ERR_INTERNAL;
  const float *xd = x->data;
  uint8_t *yd = y->data;
  for (int32_t o = 0; o < outer; o++)
    for (int32_t c = 0; c < ch; c++) {
      size_t at = ((size_t)o * ch + c) * inner;
      quantize_run(xd + at, yd + at, inner, float_at(s, c), int_at(z, c), y->dtype);
    }
  return EA_OK;
}

static void dequantize_run(const ea_tensor_t *x, size_t at, float *y, int32_t n, float s, int32_t zp) {
  const v128_t vs = wasm_f32x4_splat(s), vz = wasm_i32x4_splat(zp);
  int32_t i = 0;
  if (x->dtype == EA_I32) {
    const int32_t *p = (const int32_t *)x->data + at;
    for (; i + 4 <= n; i += 4)
      wasm_v128_store(y + i, wasm_f32x4_mul(wasm_f32x4_convert_i32x4(wasm_i32x4_sub(wasm_v128_load(p + i), vz)), vs));
    for (; i < n; i++) y[i] = (float)(p[i] - zp) * s;
    return;
  }
  const uint8_t *p = (const uint8_t *)x->data + at;
  const int32_t sgn = x->dtype == EA_I8;
  for (; i + 8 <= n; i += 8) {
    v128_t h = sgn ? wasm_i16x8_load8x8(p + i) : wasm_u16x8_load8x8(p + i);
    v128_t lo = wasm_i32x4_sub(wasm_i32x4_extend_low_i16x8(h), vz);
    v128_t hi = wasm_i32x4_sub(wasm_i32x4_extend_high_i16x8(h), vz);
    wasm_v128_store(y + i, wasm_f32x4_mul(wasm_f32x4_convert_i32x4(lo), vs));
    wasm_v128_store(y + i + 4, wasm_f32x4_mul(wasm_f32x4_convert_i32x4(hi), vs));
  }
  for (; i < n; i++) y[i] = (float)((sgn ? (int32_t)(int8_t)p[i] : (int32_t)p[i]) - zp) * s;
}

static int32_t op_dequantize(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0], *s = op->in[1], *z = op->in[2];
  ea_tensor_t *y = op->out[0];
  if (y->dtype != EA_F32 || x->count != y->count) return EA_ERR_INTERNAL;
  if (x->dtype != EA_U8 && x->dtype != EA_I8 && x->dtype != EA_I32) return EA_ERR_INTERNAL;
  int32_t outer, ch, inner;
  axis_split(x, s->count > 1 ? op->iattr[0] : -1, &outer, &ch, &inner);
  if (s->count > 1 && s->count != ch) return EA_ERR_INTERNAL;
  float *yd = y->data;
  for (int32_t o = 0; o < outer; o++)
    for (int32_t c = 0; c < ch; c++) {
      size_t at = ((size_t)o * ch + c) * inner;
      dequantize_run(x, at, yd + at, inner, float_at(s, c), int_at(z, c));
    }
  return EA_OK;
}

/* ---- DynamicQuantizeLinear ------------------------------------------------- */

static void minmax(const float *x, int32_t n, float *mn, float *mx) {
  v128_t vmn = wasm_f32x4_splat(3.402823466e38f), vmx = wasm_f32x4_splat(-3.402823466e38f);
  int32_t i = 0;
  for (; i + 4 <= n; i += 4) {
    v128_t v = wasm_v128_load(x + i);
    vmn = wasm_f32x4_pmin(vmn, v);
    vmx = wasm_f32x4_pmax(vmx, v);
  }
  float lanes_mn[4] = {wasm_f32x4_extract_lane(vmn, 0), wasm_f32x4_extract_lane(vmn, 1), wasm_f32x4_extract_lane(vmn, 2),
                       wasm_f32x4_extract_lane(vmn, 3)};
  float lanes_mx[4] = {wasm_f32x4_extract_lane(vmx, 0), wasm_f32x4_extract_lane(vmx, 1), wasm_f32x4_extract_lane(vmx, 2),
                       wasm_f32x4_extract_lane(vmx, 3)};
  float a = 3.402823466e38f, b = -3.402823466e38f;
  for (int32_t l = 0; l < 4; l++) {
    a = lanes_mn[l] < a ? lanes_mn[l] : a;
    b = lanes_mx[l] > b ? lanes_mx[l] : b;
  }
  for (; i < n; i++) {
    a = x[i] < a ? x[i] : a;
    b = x[i] > b ? x[i] : b;
  }
  *mn = a;
  *mx = b;
}

/* onnxruntime's GetQuantizationParameter<uint8_t>. */
static void dyn_params(const float *x, int32_t n, float *scale, int32_t *zp) {
  float mn, mx;
  minmax(x, n, &mn, &mx);
  mn = 0.0f < mn ? 0.0f : mn;
  mx = mx < 0.0f ? 0.0f : mx;
  float s = mx == mn ? 1.0f : (mx - mn) / 255.0f;
  float z = 0.0f - mn / s;
  z = z < 255.0f ? z : 255.0f;
  z = 0.0f < z ? z : 0.0f;
  *scale = s;
  *zp = (int32_t)rintf(z);
}

static int32_t op_dynquant(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0], *ys = op->out[1], *yz = op->out[2];
  if (x->dtype != EA_F32 || y->dtype != EA_U8 || x->count != y->count) return EA_ERR_INTERNAL;
  float s;
  int32_t zp;
  dyn_params(x->data, x->count, &s, &zp);
  if (ys) *(float *)ys->data = s;
  if (yz) *(uint8_t *)yz->data = (uint8_t)zp;
  quantize_run(x->data, y->data, x->count, s, zp, EA_U8);
  return EA_OK;
}

/* ---- integer matrix product ---------------------------------------------- */

/*
 * C[i][j] = sum_k S[i*lds + k] * V(k, j) for i < M, j < Np (a multiple of 8), where
 * V(k, j) = V[(k/2)*2*Np + 2*j + k%2] and k < 2*K2 (S rows are zero past K when K is odd).
 */
static void gemm_pairs(const int16_t *S, int32_t lds, int32_t M, const int16_t *V, int32_t Np, int32_t K2, int32_t *C,
                       int32_t ldc) {
  const size_t ldv = 2 * (size_t)Np;
  int32_t i = 0;
  for (; i + 4 <= M; i += 4) {
    const int16_t *s0 = S + (size_t)i * lds, *s1 = s0 + lds, *s2 = s1 + lds, *s3 = s2 + lds;
    for (int32_t j = 0; j < Np; j += 8) {
      const int16_t *v = V + 2 * (size_t)j;
      v128_t c00 = wasm_i32x4_splat(0), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
      for (int32_t kp = 0; kp < K2; kp++, v += ldv) {
        const v128_t v0 = wasm_v128_load(v), v1 = wasm_v128_load(v + 8);
        v128_t a = wasm_v128_load32_splat(s0 + 2 * kp);
        c00 = wasm_i32x4_add(c00, wasm_i32x4_dot_i16x8(a, v0));
        c01 = wasm_i32x4_add(c01, wasm_i32x4_dot_i16x8(a, v1));
        a = wasm_v128_load32_splat(s1 + 2 * kp);
        c10 = wasm_i32x4_add(c10, wasm_i32x4_dot_i16x8(a, v0));
        c11 = wasm_i32x4_add(c11, wasm_i32x4_dot_i16x8(a, v1));
        a = wasm_v128_load32_splat(s2 + 2 * kp);
        c20 = wasm_i32x4_add(c20, wasm_i32x4_dot_i16x8(a, v0));
        c21 = wasm_i32x4_add(c21, wasm_i32x4_dot_i16x8(a, v1));
        a = wasm_v128_load32_splat(s3 + 2 * kp);
        c30 = wasm_i32x4_add(c30, wasm_i32x4_dot_i16x8(a, v0));
        c31 = wasm_i32x4_add(c31, wasm_i32x4_dot_i16x8(a, v1));
      }
      int32_t *c = C + (size_t)i * ldc + j;
      wasm_v128_store(c, c00);
      wasm_v128_store(c + 4, c01);
      c += ldc;
      wasm_v128_store(c, c10);
      wasm_v128_store(c + 4, c11);
      c += ldc;
      wasm_v128_store(c, c20);
      wasm_v128_store(c + 4, c21);
      c += ldc;
      wasm_v128_store(c, c30);
      wasm_v128_store(c + 4, c31);
    }
  }
  for (; i < M; i++) {
    const int16_t *s0 = S + (size_t)i * lds;
    int32_t j = 0;
    for (; j + 16 <= Np; j += 16) {
      const int16_t *v = V + 2 * (size_t)j;
      v128_t c0 = wasm_i32x4_splat(0), c1 = c0, c2 = c0, c3 = c0;
      for (int32_t kp = 0; kp < K2; kp++, v += ldv) {
        const v128_t a = wasm_v128_load32_splat(s0 + 2 * kp);
        c0 = wasm_i32x4_add(c0, wasm_i32x4_dot_i16x8(a, wasm_v128_load(v)));
        c1 = wasm_i32x4_add(c1, wasm_i32x4_dot_i16x8(a, wasm_v128_load(v + 8)));
        c2 = wasm_i32x4_add(c2, wasm_i32x4_dot_i16x8(a, wasm_v128_load(v + 16)));
        c3 = wasm_i32x4_add(c3, wasm_i32x4_dot_i16x8(a, wasm_v128_load(v + 24)));
      }
      int32_t *c = C + (size_t)i * ldc + j;
      wasm_v128_store(c, c0);
      wasm_v128_store(c + 4, c1);
      wasm_v128_store(c + 8, c2);
      wasm_v128_store(c + 12, c3);
    }
    for (; j < Np; j += 8) {
      const int16_t *v = V + 2 * (size_t)j;
      v128_t c0 = wasm_i32x4_splat(0), c1 = c0;
      for (int32_t kp = 0; kp < K2; kp++, v += ldv) {
        const v128_t a = wasm_v128_load32_splat(s0 + 2 * kp);
        c0 = wasm_i32x4_add(c0, wasm_i32x4_dot_i16x8(a, wasm_v128_load(v)));
        c1 = wasm_i32x4_add(c1, wasm_i32x4_dot_i16x8(a, wasm_v128_load(v + 8)));
      }
      int32_t *c = C + (size_t)i * ldc + j;
      wasm_v128_store(c, c0);
      wasm_v128_store(c + 4, c1);
    }
  }
}

/* The output stage, per channel arrays of length >= the channel count (+3 for vector reads). */
typedef struct {
  int32_t mode, relu, out_dtype, zy;
  float lo, hi;          /* EPI_REQUANT: clamp range before adding zy */
  const float *scale;    /* per channel */
  const int32_t *ibias;  /* per channel (zeros when absent) */
  const float *fbias;    /* per channel (zeros when absent) */
} epi_t;

/* Requantized row, one channel for the whole row. */
static void epi_requant_row(const epi_t *e, const int32_t *restrict c, int32_t n, int32_t ch, uint8_t *restrict o) {
  const int32_t sgn = e->out_dtype == EA_I8, zy = e->zy, ib = e->ibias[ch];
  const float s = e->scale[ch], lo = e->lo, hi = e->hi;
  const v128_t vlo = wasm_f32x4_splat(lo), vhi = wasm_f32x4_splat(hi), vz = wasm_i32x4_splat(MAGIC_BITS - zy);
  const v128_t vs = wasm_f32x4_splat(s), vb = wasm_i32x4_splat(ib);
  int32_t j = 0;
  for (; j + 16 <= n; j += 16) {
    v128_t q0 = vqround(wasm_f32x4_mul(wasm_f32x4_convert_i32x4(wasm_i32x4_add(wasm_v128_load(c + j), vb)), vs), vlo, vhi, vz);
    v128_t q1 =
        vqround(wasm_f32x4_mul(wasm_f32x4_convert_i32x4(wasm_i32x4_add(wasm_v128_load(c + j + 4), vb)), vs), vlo, vhi, vz);
    v128_t q2 =
        vqround(wasm_f32x4_mul(wasm_f32x4_convert_i32x4(wasm_i32x4_add(wasm_v128_load(c + j + 8), vb)), vs), vlo, vhi, vz);
    v128_t q3 =
        vqround(wasm_f32x4_mul(wasm_f32x4_convert_i32x4(wasm_i32x4_add(wasm_v128_load(c + j + 12), vb)), vs), vlo, vhi, vz);
    wasm_v128_store(o + j, pack16(q0, q1, q2, q3, sgn));
  }
  for (; j + 4 <= n; j += 4)
    store4_q8(o + j, vqround(wasm_f32x4_mul(wasm_f32x4_convert_i32x4(wasm_i32x4_add(wasm_v128_load(c + j), vb)), vs), vlo, vhi, vz),
              sgn);
  for (; j < n; j++) o[j] = (uint8_t)(qround((float)(c[j] + ib) * s, lo, hi) + zy);
}

/* Requantized row, channel = column. */
static void epi_requant_cols(const epi_t *e, const int32_t *restrict c, int32_t n, uint8_t *restrict o) {
  const int32_t sgn = e->out_dtype == EA_I8, zy = e->zy;
  const float lo = e->lo, hi = e->hi;
  const float *restrict scale = e->scale;
  const int32_t *restrict ibias = e->ibias;
  const v128_t vlo = wasm_f32x4_splat(lo), vhi = wasm_f32x4_splat(hi), vz = wasm_i32x4_splat(MAGIC_BITS - zy);
  int32_t j = 0;
  for (; j + 4 <= n; j += 4) {
    v128_t f = wasm_f32x4_convert_i32x4(wasm_i32x4_add(wasm_v128_load(c + j), wasm_v128_load(ibias + j)));
    store4_q8(o + j, vqround(wasm_f32x4_mul(f, wasm_v128_load(scale + j)), vlo, vhi, vz), sgn);
  }
  for (; j < n; j++) o[j] = (uint8_t)(qround((float)(c[j] + ibias[j]) * scale[j], lo, hi) + zy);
}

/* Float row (EPI_FLOAT, EPI_DYNAMIC): float(acc + ibias) * scale + fbias, then Relu. */
static void epi_float_row(const epi_t *e, const int32_t *restrict c, int32_t n, int32_t ch, float *restrict o) {
  const int32_t ib = e->ibias[ch], relu = e->relu;
  const float s = e->scale[ch], fb = e->fbias[ch];
  const v128_t vs = wasm_f32x4_splat(s), vb = wasm_i32x4_splat(ib), vf = wasm_f32x4_splat(fb), zero = wasm_f32x4_splat(0.0f);
  int32_t j = 0;
  if (relu) {
    for (; j + 4 <= n; j += 4) {
      v128_t f = wasm_f32x4_convert_i32x4(wasm_i32x4_add(wasm_v128_load(c + j), vb));
      wasm_v128_store(o + j, wasm_f32x4_pmax(wasm_f32x4_add(wasm_f32x4_mul(f, vs), vf), zero));
    }
  } else {
    for (; j + 4 <= n; j += 4) {
      v128_t f = wasm_f32x4_convert_i32x4(wasm_i32x4_add(wasm_v128_load(c + j), vb));
      wasm_v128_store(o + j, wasm_f32x4_add(wasm_f32x4_mul(f, vs), vf));
    }
  }
  for (; j < n; j++) {
    float f = (float)(c[j] + ib) * s + fb;
    o[j] = relu && f < 0.0f ? 0.0f : f;
  }
}

/* Float row, channel = column. */
static void epi_float_cols(const epi_t *e, const int32_t *restrict c, int32_t n, float *restrict o) {
  const int32_t relu = e->relu;
  const float *restrict scale = e->scale, *restrict fbias = e->fbias;
  const int32_t *restrict ibias = e->ibias;
  const v128_t zero = wasm_f32x4_splat(0.0f);
  int32_t j = 0;
  for (; j + 4 <= n; j += 4) {
    v128_t f = wasm_f32x4_convert_i32x4(wasm_i32x4_add(wasm_v128_load(c + j), wasm_v128_load(ibias + j)));
    f = wasm_f32x4_add(wasm_f32x4_mul(f, wasm_v128_load(scale + j)), wasm_v128_load(fbias + j));
    if (relu) f = wasm_f32x4_pmax(f, zero);
    wasm_v128_store(o + j, f);
  }
  for (; j < n; j++) {
    float f = (float)(c[j] + ibias[j]) * scale[j] + fbias[j];
    o[j] = relu && f < 0.0f ? 0.0f : f;
  }
}

/* One row of n results: the channel is `ch` for the whole row (ch >= 0) or the column (ch < 0). */
static void epilogue(const epi_t *e, const int32_t *c, int32_t n, int32_t ch, void *out) {
  if (e->mode == EPI_INT32) {
    int32_t *o = out;
    for (int32_t j = 0; j < n; j++) o[j] = c[j];
  } else if (e->mode == EPI_REQUANT) {
    if (ch >= 0) epi_requant_row(e, c, n, ch, out);
    else epi_requant_cols(e, c, n, out);
  } else {
    if (ch >= 0) epi_float_row(e, c, n, ch, out);
    else epi_float_cols(e, c, n, out);
  }
}

/* Per-channel arrays of an epilogue (n channels, padded by 4 for vector reads) in scratch. */
static int32_t epi_setup(const ea_op_t *op, epi_t *e, int32_t mode, int32_t relu, int32_t n) {
  const int32_t np = round_up(n, 4) + 4;
  float *scale = ea_scratch((uint32_t)np * 4);
  int32_t *ibias = ea_scratch((uint32_t)np * 4);
  float *fbias = ea_scratch((uint32_t)np * 4);
  if (!scale || !ibias || !fbias) return EA_ERR_NOMEM;
  const ea_tensor_t *bias = op->in[IN_BIAS];
  for (int32_t i = 0; i < np; i++) {
    scale[i] = 0.0f;
    ibias[i] = 0;
    fbias[i] = 0.0f;
  }
  for (int32_t i = 0; i < n && bias; i++) {
    if (bias->dtype == EA_I32) ibias[i] = int_at(bias, i);
    else fbias[i] = float_at(bias, i);
  }
  e->mode = mode;
  e->relu = relu;
  e->out_dtype = op->out[0]->dtype;
  e->zy = int_at(op->in[IN_YZP], 0);
  e->scale = scale;
  e->ibias = ibias;
  e->fbias = fbias;
  if (mode == EPI_REQUANT) {
    e->lo = (float)(qmin_of(e->out_dtype) - e->zy);
    e->hi = (float)(qmax_of(e->out_dtype) - e->zy);
    if (relu && e->lo < 0.0f) e->lo = 0.0f;
  }
  return EA_OK;
}

/* scale[i] for every channel: requant (alpha*xs*ws)/ys, float alpha*xs*ws, dynamic xs*ws. */
static void epi_scales(const ea_op_t *op, const epi_t *e, int32_t n, float xs, float alpha) {
  float *scale = (float *)e->scale;
  const ea_tensor_t *ws = op->in[IN_WS];
  for (int32_t i = 0; i < n; i++) {
    float w = float_at(ws, i);
    if (e->mode == EPI_REQUANT) scale[i] = alpha * xs * w / float_at(op->in[IN_YS], 0);
    else if (e->mode == EPI_FLOAT) scale[i] = alpha * xs * w;
    else scale[i] = xs * w;
  }
}

/* dst[0..K) = a[0..K) - za. */
static void widen_row(const uint8_t *a, int32_t sgn, int32_t K, int32_t za, int16_t *dst) {
  const v128_t vz = wasm_i16x8_splat((int16_t)za);
  int32_t k = 0;
  for (; k + 8 <= K; k += 8) {
    v128_t h = sgn ? wasm_i16x8_load8x8(a + k) : wasm_u16x8_load8x8(a + k);
    wasm_v128_store(dst + k, wasm_i16x8_sub(h, vz));
  }
  for (; k + 4 <= K; k += 4) {
    v128_t b = wasm_v128_load32_zero(a + k);
    v128_t h = sgn ? wasm_i16x8_extend_low_i8x16(b) : wasm_u16x8_extend_low_u8x16(b);
    wasm_v128_store64_lane(dst + k, wasm_i16x8_sub(h, vz), 0);
  }
  for (; k < K; k++) dst[k] = (int16_t)((sgn ? (int32_t)(int8_t)a[k] : (int32_t)a[k]) - za);
}

/* dst[0..K) = quantized(x) - zp = round_even(clamp(x / s, -zp, 255 - zp)), as int16. */
static void quantize_row_s16(const float *x, int32_t K, float s, int32_t zp, int16_t *dst) {
  const float lo = (float)-zp, hi = (float)(255 - zp);
  const v128_t vs = wasm_f32x4_splat(s), vlo = wasm_f32x4_splat(lo), vhi = wasm_f32x4_splat(hi);
  const v128_t vz = wasm_i32x4_splat(MAGIC_BITS);
  int32_t k = 0;
  for (; k + 8 <= K; k += 8) {
    v128_t q0 = vqround(wasm_f32x4_div(wasm_v128_load(x + k), vs), vlo, vhi, vz);
    v128_t q1 = vqround(wasm_f32x4_div(wasm_v128_load(x + k + 4), vs), vlo, vhi, vz);
    wasm_v128_store(dst + k, wasm_i16x8_narrow_i32x4(q0, q1));
  }
  for (; k + 4 <= K; k += 4) {
    v128_t q0 = vqround(wasm_f32x4_div(wasm_v128_load(x + k), vs), vlo, vhi, vz);
    wasm_v128_store64_lane(dst + k, wasm_i16x8_narrow_i32x4(q0, q0), 0);
  }
  for (; k < K; k++) dst[k] = (int16_t)qround(x[k] / s, lo, hi);
}

/* Packs B(k, n) - zb[n] into pairs V[(k/2)*2*Np + 2*n + k%2] (zero padded). */
static void pack_b(const uint8_t *b, int32_t sgn, int32_t K, int32_t N, int32_t transB, const ea_tensor_t *zb, int16_t *V,
                   int32_t Np) {
  const int32_t K2 = (K + 1) / 2;
  for (size_t i = 0; i < (size_t)K2 * 2 * Np; i++) V[i] = 0;
  for (int32_t k = 0; k < K; k++)
    for (int32_t n = 0; n < N; n++) {
      size_t at = transB ? (size_t)n * K + k : (size_t)k * N + n;
      int32_t v = sgn ? (int32_t)(int8_t)b[at] : (int32_t)b[at];
      V[(size_t)(k / 2) * 2 * Np + 2 * n + (k & 1)] = (int16_t)(v - int_at(zb, n));
    }
}

typedef struct {
  const ea_op_t *op;
  epi_t e;
  int32_t K, N, Kp, K2, Np;
  const int16_t *V; /* packed B */
  int16_t *abuf;    /* MM_ROWS x Kp */
  int32_t *cbuf;    /* MM_ROWS x Np */
} mm_t;

/* rows of A (bytes or floats at `a`, row stride K) -> rows of Y (at `y`, row stride N). */
static void mm_rows(mm_t *m, const void *a, int32_t rows, int32_t za, void *y) {
  const int32_t K = m->K, sgn = m->op->in[IN_X]->dtype == EA_I8;
  const int32_t esize = ea_dtype_size(m->op->out[0]->dtype);
  for (int32_t r0 = 0; r0 < rows; r0 += MM_ROWS) {
    int32_t nr = EA_MIN(MM_ROWS, rows - r0);
    for (int32_t r = 0; r < nr; r++) {
      int16_t *dst = m->abuf + (size_t)r * m->Kp;
      widen_row((const uint8_t *)a + (size_t)(r0 + r) * K, sgn, K, za, dst);
      if (K & 1) dst[K] = 0;
    }
    gemm_pairs(m->abuf, m->Kp, nr, m->V, m->Np, m->K2, m->cbuf, m->Np);
    for (int32_t r = 0; r < nr; r++)
      epilogue(&m->e, m->cbuf + (size_t)r * m->Np, m->N, -1, (uint8_t *)y + ((size_t)(r0 + r) * m->N) * esize);
  }
}

/* Dynamic float row, channel = column: float(acc) * (xs * ws[j]) + fbias[j] (the products onnxruntime's Mul nodes make). */
static void epi_dynamic_cols(const epi_t *e, const int32_t *restrict c, int32_t n, float xs, float *restrict o) {
  const int32_t relu = e->relu;
  const float *restrict ws = e->scale, *restrict fbias = e->fbias;
  const v128_t vx = wasm_f32x4_splat(xs), zero = wasm_f32x4_splat(0.0f);
  int32_t j = 0;
  for (; j + 4 <= n; j += 4) {
    v128_t s = wasm_f32x4_mul(vx, wasm_v128_load(ws + j));
    v128_t f = wasm_f32x4_add(wasm_f32x4_mul(wasm_f32x4_convert_i32x4(wasm_v128_load(c + j)), s), wasm_v128_load(fbias + j));
    if (relu) f = wasm_f32x4_pmax(f, zero);
    wasm_v128_store(o + j, f);
  }
  for (; j < n; j++) {
    float f = (float)c[j] * (xs * ws[j]) + fbias[j];
    o[j] = relu && f < 0.0f ? 0.0f : f;
  }
}

/*
 * Dynamic MatMul: rows of float A, quantized with the range of their unit (unit_rows rows),
 * many units' rows in one GEMM block (one row per unit is the common case: a batch of rows).
 * e->scale holds the weights' scales; each row's own input scale multiplies them in the epilogue.
 */
static void mm_dynamic(mm_t *m, const float *a, int32_t rows, int32_t unit_rows, float *y) {
  const int32_t K = m->K;
  float row_scale[MM_ROWS];
  int32_t cur = -1, zp = 0;
  float s = 1.0f;
  for (int32_t r0 = 0; r0 < rows; r0 += MM_ROWS) {
    int32_t nr = EA_MIN(MM_ROWS, rows - r0);
    for (int32_t r = 0; r < nr; r++) {
      const int32_t row = r0 + r, u = row / unit_rows;
      if (u != cur) {
        dyn_params(a + (size_t)u * unit_rows * K, unit_rows * K, &s, &zp);
        cur = u;
      }
      row_scale[r] = s;
      int16_t *dst = m->abuf + (size_t)r * m->Kp;
      quantize_row_s16(a + (size_t)row * K, K, s, zp, dst);
      if (K & 1) dst[K] = 0;
    }
    gemm_pairs(m->abuf, m->Kp, nr, m->V, m->Np, m->K2, m->cbuf, m->Np);
    for (int32_t r = 0; r < nr; r++)
      epi_dynamic_cols(&m->e, m->cbuf + (size_t)r * m->Np, m->N, row_scale[r], y + (size_t)(r0 + r) * m->N);
  }
}

static int32_t op_qmatmul(const ea_op_t *op) {
  const ea_tensor_t *A = op->in[IN_X], *B = op->in[IN_W];
  ea_tensor_t *Y = op->out[0];
  const int32_t *at = op->iattr;
  if (op->n_i < MM_COUNT) return EA_ERR_INTERNAL;
  mm_t m;
  m.op = op;
  m.K = at[MM_K];
  m.N = at[MM_N];
  m.Kp = m.K + (m.K & 1);
  m.K2 = m.Kp / 2;
  m.Np = round_up(m.N, 8);
  const int32_t mode = at[MM_MODE];
  const float alpha = op->n_f > 0 ? op->fattr[0] : 1.0f;
  if (m.K <= 0 || m.N <= 0 || A->count % m.K) return EA_ERR_INTERNAL;
  int32_t status = epi_setup(op, &m.e, mode, at[MM_RELU], m.N);
  if (status != EA_OK) return status;
  m.abuf = ea_scratch((uint32_t)MM_ROWS * m.Kp * 2);
  m.cbuf = ea_scratch((uint32_t)MM_ROWS * m.Np * 4);
  if (!m.abuf || !m.cbuf) return EA_ERR_NOMEM;
  const int32_t esize_a = ea_dtype_size(A->dtype), esize_y = ea_dtype_size(Y->dtype);
  const int32_t za = int_at(op->in[IN_XZP], 0);

  if (at[MM_B_PACKED] || B->rank == 2) {
    /* One B: every row of A (all leading dimensions) against it. */
    int16_t *packed = 0;
    if (at[MM_B_PACKED]) {
      m.V = (const int16_t *)B->data;
    } else {
      packed = ea_scratch((uint32_t)m.K2 * m.Np * 4 + 32);
      if (!packed) return EA_ERR_NOMEM;
      pack_b(B->data, B->dtype == EA_I8, m.K, m.N, at[MM_TRANS_B], op->in[IN_WZP], packed, m.Np);
      m.V = packed;
    }
    const int32_t rows = A->count / m.K;
    if (rows * m.N != Y->count) return EA_ERR_INTERNAL;
    if (mode == EPI_DYNAMIC) {
      int32_t unit = at[MM_UNIT] > 0 ? at[MM_UNIT] : A->count;
      if (unit % m.K || (unit && A->count % unit)) return EA_ERR_INTERNAL;
      epi_scales(op, &m.e, m.N, 1.0f, 1.0f); /* the weights' scales alone (1 * w is exact) */
      mm_dynamic(&m, A->data, rows, unit / m.K, Y->data);
    } else {
      epi_scales(op, &m.e, m.N, float_at(op->in[IN_XS], 0), alpha);
      mm_rows(&m, A->data, rows, za, Y->data);
    }
    return EA_OK;
  }

  /* Batched B (rank > 2): broadcast the batch dimensions of A and B over Y's. */
  if (A->rank < 2 || Y->rank < 2 || mode == EPI_DYNAMIC) return EA_ERR_INTERNAL;
  const int32_t M = A->dims[A->rank - 2];
  const int32_t yb = Y->rank - 2, ab = A->rank - 2, bb = B->rank - 2;
  const int32_t nbatch = Y->count / (M * m.N);
  int16_t *packed = ea_scratch((uint32_t)m.K2 * m.Np * 4 + 32);
  if (!packed) return EA_ERR_NOMEM;
  m.V = packed;
  epi_scales(op, &m.e, m.N, float_at(op->in[IN_XS], 0), alpha);
  int32_t last_b = -1;
  for (int32_t bi = 0; bi < nbatch; bi++) {
    int32_t rem = bi, aoff = 0, boff = 0, astr = 1, bstr = 1;
    for (int32_t d = yb - 1; d >= 0; d--) {
      int32_t idx = rem % Y->dims[d];
      rem /= Y->dims[d];
      int32_t ad = d - (yb - ab), bd = d - (yb - bb);
      if (ad >= 0) {
        aoff += (A->dims[ad] == 1 ? 0 : idx) * astr;
        astr *= A->dims[ad];
      }
      if (bd >= 0) {
        boff += (B->dims[bd] == 1 ? 0 : idx) * bstr;
        bstr *= B->dims[bd];
      }
    }
    if (boff != last_b) {
      pack_b((const uint8_t *)B->data + (size_t)boff * m.K * m.N, B->dtype == EA_I8, m.K, m.N, 0, op->in[IN_WZP], packed,
             m.Np);
      last_b = boff;
    }
    mm_rows(&m, (const uint8_t *)A->data + (size_t)aoff * M * m.K * esize_a, M, za,
            (uint8_t *)Y->data + (size_t)bi * M * m.N * esize_y);
  }
  return EA_OK;
}

/* ---- integer convolution -------------------------------------------------- */

/* Rows of output per im2col block (agent/convert/ops/quant.py: conv_block_rows). */
static int32_t conv_block_rows(int32_t K2, int32_t OW, int32_t OH) {
  int32_t row_bytes = K2 * OW * 4;
  int32_t rows = row_bytes > 0 ? CONV_VBUDGET / row_bytes : OH;
  if (rows < 1) rows = 1;
  if (rows > OH) rows = OH;
  return rows;
}

static int32_t op_qconv(const ea_op_t *op) {
  const ea_tensor_t *X = op->in[IN_X], *W = op->in[IN_W];
  ea_tensor_t *Y = op->out[0];
  const int32_t *at = op->iattr;
  if (op->n_i < CV_COUNT || (X->rank != 3 && X->rank != 4) || Y->rank != X->rank) return EA_ERR_INTERNAL;
  const int32_t mode = at[CV_MODE], G = at[CV_GROUP];
  const int32_t kh = at[CV_KH], kw = at[CV_KW], sh = at[CV_SH], sw = at[CV_SW], dh = at[CV_DH], dw = at[CV_DW];
  const int32_t pt = at[CV_PT], pl = at[CV_PL], pb = at[CV_PB], pr = at[CV_PR];
  const int32_t NB = X->dims[0], C = X->dims[1];
  const int32_t H = X->rank == 4 ? X->dims[2] : 1, Wd = X->dims[X->rank - 1];
  const int32_t OC = Y->dims[1], OH = Y->rank == 4 ? Y->dims[2] : 1, OW = Y->dims[Y->rank - 1];
  if (G < 1 || C % G || OC % G) return EA_ERR_INTERNAL;
  const int32_t Cg = C / G, OCg = OC / G, K = Cg * kh * kw, Kp = K + (K & 1), K2 = Kp / 2;
  const int32_t Hp = H + pt + pb, Wp = Wd + pl + pr;
  const size_t plane = (size_t)Hp * Wp, P = (size_t)OH * OW;
  const int32_t esize_y = ea_dtype_size(Y->dtype);

  epi_t e;
  int32_t status = epi_setup(op, &e, mode, at[CV_RELU], OC);
  if (status != EA_OK) return status;
  int16_t *xpad = ea_scratch((uint32_t)(C * plane + 16) * 2);
  const int32_t brows = conv_block_rows(K2, OW, OH);
  const int32_t npos_max = round_up(brows * OW, 8);
  int16_t *V = ea_scratch((uint32_t)K2 * npos_max * 4 + 32);
  int32_t *cbuf = ea_scratch((uint32_t)OCg * npos_max * 4);
  if (!xpad || !V || !cbuf) return EA_ERR_NOMEM;
  const int16_t *wpk;
  if (at[CV_W_PACKED]) {
    wpk = (const int16_t *)W->data;
  } else {
    int16_t *w16 = ea_scratch((uint32_t)OC * Kp * 2);
    if (!w16) return EA_ERR_NOMEM;
    const uint8_t *wb = W->data;
    const int32_t sgn = W->dtype == EA_I8;
    for (int32_t oc = 0; oc < OC; oc++) {
      int32_t zw = int_at(op->in[IN_WZP], oc);
      for (int32_t k = 0; k < K; k++) {
        uint8_t b = wb[(size_t)oc * K + k];
        w16[(size_t)oc * Kp + k] = (int16_t)((sgn ? (int32_t)(int8_t)b : (int32_t)b) - zw);
      }
      if (K & 1) w16[(size_t)oc * Kp + K] = 0;
    }
    wpk = w16;
  }
  /* Per-k source offsets in the padded image: channel-in-group, ky, kx. */
  int32_t *koff = ea_scratch((uint32_t)Kp * 4);
  if (!koff) return EA_ERR_NOMEM;
  for (int32_t k = 0; k < Kp; k++) {
    int32_t kk = k < K ? k : K - 1;
    int32_t c = kk / (kh * kw), r = kk % (kh * kw);
    koff[k] = (int32_t)(c * plane + (size_t)(r / kw) * dh * Wp + (size_t)(r % kw) * dw);
  }
  if (mode != EPI_DYNAMIC) epi_scales(op, &e, OC, float_at(op->in[IN_XS], 0), 1.0f);
  const int32_t za = int_at(op->in[IN_XZP], 0);
  const int32_t sgn = X->dtype == EA_I8;

  for (int32_t n = 0; n < NB; n++) {
    /* The image as int16 (value - zero point) with a zero border of the padding. */
    memset(xpad, 0, (C * plane + 16) * 2);
    const size_t img = (size_t)C * H * Wd;
    float s = 1.0f;
    int32_t zp = za;
    if (mode == EPI_DYNAMIC) {
      const float *xf = (const float *)X->data + n * img;
      dyn_params(xf, (int32_t)img, &s, &zp);
      epi_scales(op, &e, OC, s, 1.0f);
      for (int32_t c = 0; c < C; c++)
        for (int32_t y = 0; y < H; y++) {
          int16_t *row = xpad + c * plane + (size_t)(y + pt) * Wp + pl;
          quantize_row_s16(xf + ((size_t)c * H + y) * Wd, Wd, s, zp, row);
        }
    } else {
      const uint8_t *xb = (const uint8_t *)X->data + n * img;
      for (int32_t c = 0; c < C; c++)
        for (int32_t y = 0; y < H; y++) {
          int16_t *row = xpad + c * plane + (size_t)(y + pt) * Wp + pl;
          widen_row(xb + ((size_t)c * H + y) * Wd, sgn, Wd, zp, row);
        }
    }
    for (int32_t g = 0; g < G; g++) {
      const int16_t *xg = xpad + (size_t)g * Cg * plane;
      for (int32_t oy0 = 0; oy0 < OH; oy0 += brows) {
        const int32_t nrows = EA_MIN(brows, OH - oy0), pos = nrows * OW, npos = round_up(pos, 8);
        const size_t ldv = 2 * (size_t)npos;
        /* im2col in pairs along k. */
        for (int32_t kp = 0; kp < K2; kp++) {
          const int32_t o0 = koff[2 * kp], o1 = koff[2 * kp + 1];
          int16_t *dst = V + kp * ldv;
          for (int32_t r = 0; r < nrows; r++) {
            const int16_t *src = xg + (size_t)(oy0 + r) * sh * Wp;
            const int16_t *s0 = src + o0, *s1 = src + o1;
            int16_t *d = dst + 2 * (size_t)r * OW;
            if (sw == 1) {
              for (int32_t x = 0; x < OW; x += 8) {
                v128_t a = wasm_v128_load(s0 + x), b = wasm_v128_load(s1 + x);
                wasm_v128_store(d + 2 * x, wasm_i16x8_shuffle(a, b, 0, 8, 1, 9, 2, 10, 3, 11));
                wasm_v128_store(d + 2 * x + 8, wasm_i16x8_shuffle(a, b, 4, 12, 5, 13, 6, 14, 7, 15));
              }
            } else {
              for (int32_t x = 0; x < OW; x++) {
                d[2 * x] = s0[(size_t)x * sw];
                d[2 * x + 1] = s1[(size_t)x * sw];
              }
            }
          }
        }
        gemm_pairs(wpk + (size_t)g * OCg * Kp, Kp, OCg, V, npos, K2, cbuf, npos);
        for (int32_t oc = 0; oc < OCg; oc++) {
          const int32_t ch = g * OCg + oc;
          uint8_t *out = (uint8_t *)Y->data + (((size_t)n * OC + ch) * P + (size_t)oy0 * OW) * esize_y;
          epilogue(&e, cbuf + (size_t)oc * npos, pos, ch, out);
        }
      }
    }
  }
  return EA_OK;
}

/* ---- elementwise QLinearAdd / QLinearMul ---------------------------------- */

/* Element strides of t broadcast to out's shape (0 along broadcast dimensions). */
static void bcast_strides(const ea_tensor_t *t, const ea_tensor_t *out, int32_t *st) {
  int32_t r = out->rank, off = r - t->rank, s = 1;
  for (int32_t i = r - 1; i >= 0; i--) {
    int32_t ti = i - off;
    if (ti < 0) {
      st[i] = 0;
    } else {
      st[i] = (t->dims[ti] == 1 && out->dims[i] != 1) ? 0 : s;
      s *= t->dims[ti];
    }
  }
}

static inline int32_t load_q(const uint8_t *p, size_t i, int32_t sgn) { return sgn ? (int32_t)(int8_t)p[i] : (int32_t)p[i]; }

/* a * b + c, fused (relaxed_madd, deterministic in the agent's engine: ea_gemm.h's EA_MADD). */
#define QMADD(a, b, c) ((v128_t)__builtin_wasm_fma_f32x4((__f32x4)(a), (__f32x4)(b), (__f32x4)(c)))

/* Four quantized values at p (stride 1, or 0: one value broadcast) as f32x4. */
static inline v128_t load4_qf(const uint8_t *p, int32_t stride, int32_t sgn) {
  if (!stride) return wasm_f32x4_splat((float)(sgn ? (int32_t)(int8_t)p[0] : (int32_t)p[0]));
  v128_t b = wasm_v128_load32_zero(p);
  v128_t h = sgn ? wasm_i16x8_extend_low_i8x16(b) : wasm_u16x8_extend_low_u8x16(b);
  return wasm_f32x4_convert_i32x4(wasm_i32x4_extend_low_i16x8(h));
}

/*
 * One row of QLinearAdd as onnxruntime's AVX2 kernel (MlasQLinearAddKernelAvx2Helper):
 * fma(a, ra, fma(b, rb, fixed)), fixed = zc - (ra*za + rb*zb); an operand that is one
 * value for the row (stride 0) is folded into `fixed` first (the compiler contracts that to an FMA too).
 */
static void qadd_row(const uint8_t *a, int32_t ia, int32_t sga, const uint8_t *b, int32_t ib, int32_t sgb, int32_t n,
                     float ra, float rb, float fixed, int32_t dt, uint8_t *y) {
  const v128_t vra = wasm_f32x4_splat(ra), vrb = wasm_f32x4_splat(rb);
  const v128_t vlo = wasm_f32x4_splat((float)qmin_of(dt)), vhi = wasm_f32x4_splat((float)qmax_of(dt));
  const v128_t vz = wasm_i32x4_splat(MAGIC_BITS);
  const int32_t sgn = dt == EA_I8;
  v128_t vfixed = wasm_f32x4_splat(fixed);
  if (!ia) vfixed = QMADD(load4_qf(a, 0, sga), vra, vfixed);
  else if (!ib) vfixed = QMADD(load4_qf(b, 0, sgb), vrb, vfixed);
  uint8_t ta[4] = {0, 0, 0, 0}, tb[4] = {0, 0, 0, 0}, ty[4];
  for (int32_t j = 0; j < n; j += 4) {
    const uint8_t *pa = a + j * ia, *pb = b + j * ib;
    const int32_t tail = j + 4 > n;
    if (tail) { /* no read past the operands' ends */
      for (int32_t t = 0; j + t < n; t++) {
        ta[t] = pa[t * ia];
        tb[t] = pb[t * ib];
      }
      if (ia) pa = ta;
      if (ib) pb = tb;
    }
    v128_t r;
    if (!ia) r = QMADD(load4_qf(pb, ib, sgb), vrb, vfixed);
    else if (!ib) r = QMADD(load4_qf(pa, ia, sga), vra, vfixed);
    else r = QMADD(load4_qf(pa, 1, sga), vra, QMADD(load4_qf(pb, 1, sgb), vrb, vfixed));
    v128_t q = vqround(r, vlo, vhi, vz);
    if (!tail) {
      store4_q8(y + j, q, sgn);
    } else {
      store4_q8(ty, q, sgn);
      for (int32_t t = 0; j + t < n; t++) y[j + t] = ty[t];
    }
  }
}

static int32_t op_qbinary(const ea_op_t *op) {
  const ea_tensor_t *A = op->in[0], *B = op->in[3];
  ea_tensor_t *Y = op->out[0];
  const int32_t is_mul = (op->opcode & 63u) == OP_QMUL;
  const float sa = float_at(op->in[1], 0), sb = float_at(op->in[4], 0), sc = float_at(op->in[6], 0);
  const int32_t za = int_at(op->in[2], 0), zb = int_at(op->in[5], 0), zc = int_at(op->in[7], 0);
  const int32_t sa_gn = A->dtype == EA_I8, sb_gn = B->dtype == EA_I8, dt = Y->dtype;
  const int32_t qmin = qmin_of(dt), qmax = qmax_of(dt);
  /* QLinearAdd: qadd_row; QLinearMul (MLAS): round(float((a-za)*(b-zb)) * (sa*sb/sc)) + zc. */
  const float ra = sa / sc, rb = sb / sc, fixed = (float)zc - (ra * (float)za + rb * (float)zb);
  const float rmul = sa * sb / sc;
  const float lo_mul = (float)(qmin - zc), hi_mul = (float)(qmax - zc);
  const uint8_t *a = A->data, *b = B->data;
  uint8_t *y = Y->data;
  int32_t sta[EA_MAX_RANK], stb[EA_MAX_RANK];
  bcast_strides(A, Y, sta);
  bcast_strides(B, Y, stb);
  const int32_t R = Y->rank;
  const int32_t inner = R ? Y->dims[R - 1] : 1;
  const int32_t ia = R ? sta[R - 1] : 0, ib = R ? stb[R - 1] : 0;
  const int32_t rows = inner ? Y->count / inner : 0;
  int32_t idx[EA_MAX_RANK];
  for (int32_t d = 0; d < EA_MAX_RANK; d++) idx[d] = 0;
  size_t oa = 0, ob = 0;
  for (int32_t row = 0; row < rows; row++) {
    uint8_t *yr = y + (size_t)row * inner;
    if (!is_mul) {
      qadd_row(a + oa, ia, sa_gn, b + ob, ib, sb_gn, inner, ra, rb, fixed, dt, yr);
    } else {
      for (int32_t j = 0; j < inner; j++) {
        int32_t av = load_q(a, oa + (size_t)j * ia, sa_gn), bv = load_q(b, ob + (size_t)j * ib, sb_gn);
        yr[j] = (uint8_t)(qround((float)((av - za) * (bv - zb)) * rmul, lo_mul, hi_mul) + zc);
      }
    }
    /* Next row: increment the multi-index over dims [0, R-1). */
    for (int32_t d = R - 2; d >= 0; d--) {
      idx[d]++;
      oa += sta[d];
      ob += stb[d];
      if (idx[d] < Y->dims[d]) break;
      oa -= (size_t)sta[d] * Y->dims[d];
      ob -= (size_t)stb[d] * Y->dims[d];
      idx[d] = 0;
    }
  }
  return EA_OK;
}

/* ---- QLinearGlobalAveragePool ------------------------------------------------ */

static int32_t op_qgap(const ea_op_t *op) {
  const ea_tensor_t *X = op->in[0];
  ea_tensor_t *Y = op->out[0];
  const int32_t channels_last = op->iattr[0];
  if (X->rank < 3) return EA_ERR_INTERNAL;
  const int32_t NB = X->dims[0], C = channels_last ? X->dims[X->rank - 1] : X->dims[1];
  const int32_t img = NB && C ? X->count / (NB * C) : 0;
  const float xs = float_at(op->in[1], 0), ys = float_at(op->in[3], 0);
  const int32_t zx = int_at(op->in[2], 0), zy = int_at(op->in[4], 0), sgn = X->dtype == EA_I8;
  const float scale = xs / (ys * (float)img);
  const float lo = (float)(qmin_of(Y->dtype) - zy), hi = (float)(qmax_of(Y->dtype) - zy);
  const uint8_t *x = X->data;
  uint8_t *y = Y->data;
  for (int32_t n = 0; n < NB; n++)
    for (int32_t c = 0; c < C; c++) {
      int32_t acc = -zx * img;
      if (channels_last) {
        const uint8_t *p = x + (size_t)n * img * C + c;
        for (int32_t i = 0; i < img; i++) acc += load_q(p, (size_t)i * C, sgn);
      } else {
        const uint8_t *p = x + ((size_t)n * C + c) * img;
        for (int32_t i = 0; i < img; i++) acc += load_q(p, i, sgn);
      }
      y[(size_t)n * C + c] = (uint8_t)(qround((float)acc * scale, lo, hi) + zy);
    }
  return EA_OK;
}

/* ---- QLinearSoftmax (onnxruntime's lookup-table kernel) ------------------------ */

static int32_t op_qsoftmax(const ea_op_t *op) {
  const ea_tensor_t *X = op->in[0];
  ea_tensor_t *Y = op->out[0];
  const float *table = op->in[1]->data;
  const int32_t axis = op->iattr[0], coerce = op->iattr[1];
  if (axis < 0 || axis >= X->rank) return EA_ERR_INTERNAL;
  int32_t outer = 1, D = 1, inner = 1;
  for (int32_t i = 0; i < axis; i++) outer *= X->dims[i];
  if (coerce) {
    for (int32_t i = axis; i < X->rank; i++) D *= X->dims[i];
  } else {
    D = X->dims[axis];
    for (int32_t i = axis + 1; i < X->rank; i++) inner *= X->dims[i];
  }
  const float ysf = floorf(1.0f / float_at(op->in[2], 0));
  const int32_t zy = int_at(op->in[3], 0), sgn = X->dtype == EA_I8;
  const int32_t qmin = qmin_of(Y->dtype), qmax = qmax_of(Y->dtype);
  const uint8_t *x = X->data;
  uint8_t *y = Y->data;
  for (int32_t o = 0; o < outer; o++)
    for (int32_t i = 0; i < inner; i++) {
      const size_t base = (size_t)o * D * inner + i;
      int32_t xmax = sgn ? -128 : 0;
      for (int32_t d = 0; d < D; d++) {
        int32_t v = load_q(x, base + (size_t)d * inner, sgn);
        xmax = v > xmax ? v : xmax;
      }
      /* uint8: table[255 - xmax + x]; int8: table[(uint8)(127 - xmax + x)] */
      const int32_t shift = sgn ? 127 - xmax : 255 - xmax;
      float vsum = 0.0f;
      for (int32_t d = 0; d < D; d++) vsum += table[(uint8_t)(shift + load_q(x, base + (size_t)d * inner, sgn))];
      for (int32_t d = 0; d < D; d++) {
        const size_t at = base + (size_t)d * inner;
        const float vt = table[(uint8_t)(shift + load_q(x, at, sgn))];
        int32_t vq = (int32_t)nearbyintf((vt * ysf) / vsum) + zy;
        vq = vq < qmin ? qmin : vq > qmax ? qmax : vq; /* onnxruntime 1.2x saturates (older code wrapped int8) */
        y[at] = (uint8_t)vq;
      }
    }
  return EA_OK;
}

/* ---- lookup tables and QLinearConcat -------------------------------------- */

static int32_t op_lut(const ea_op_t *op) {
  const ea_tensor_t *X = op->in[0];
  ea_tensor_t *Y = op->out[0];
  const uint8_t *t = op->in[1]->data, *x = X->data;
  uint8_t *y = Y->data;
  if (X->count != Y->count) return EA_ERR_INTERNAL;
  for (int32_t i = 0; i < X->count; i++) y[i] = t[x[i]];
  return EA_OK;
}

static int32_t op_qconcat(const ea_op_t *op) {
  ea_tensor_t *Y = op->out[0];
  const int32_t axis = op->iattr[0];
  if (axis < 0 || axis >= Y->rank || op->n_in % 2) return EA_ERR_INTERNAL;
  int32_t outer = 1, inner_y = 1;
  for (int32_t i = 0; i < axis; i++) outer *= Y->dims[i];
  for (int32_t i = axis; i < Y->rank; i++) inner_y *= Y->dims[i];
  uint8_t *y = Y->data;
  int32_t offset = 0;
  for (int32_t k = 0; k < op->n_in; k += 2) {
    const ea_tensor_t *X = op->in[k];
    const uint8_t *t = op->in[k + 1] ? (const uint8_t *)op->in[k + 1]->data : 0;
    const int32_t inner = outer ? X->count / outer : 0;
    const uint8_t *x = X->data;
    for (int32_t o = 0; o < outer; o++) {
      uint8_t *d = y + (size_t)o * inner_y + offset;
      const uint8_t *s = x + (size_t)o * inner;
      if (t) {
        for (int32_t i = 0; i < inner; i++) d[i] = t[s[i]];
      } else {
        memcpy(d, s, (size_t)inner);
      }
    }
    offset += inner;
  }
  return EA_OK;
}

ea_kernel_fn ea_ops_quant(uint32_t opcode) {
  switch (opcode & 63u) {
  case OP_QUANTIZE: return op_quantize;
  case OP_DEQUANTIZE: return op_dequantize;
  case OP_DYNQUANT: return op_dynquant;
  case OP_QMATMUL: return op_qmatmul;
  case OP_QCONV: return op_qconv;
  case OP_QADD: return op_qbinary;
  case OP_QMUL: return op_qbinary;
  case OP_QGAP: return op_qgap;
  case OP_QSOFTMAX: return op_qsoftmax;
  case OP_LUT: return op_lut;
  case OP_QCONCAT: return op_qconcat;
  default: return 0;
  }
}
