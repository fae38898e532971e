/*
 * ops_reduce.c: family 7, reductions and ops along an axis: Reduce*, Softmax,
 * LogSoftmax, Hardmax, ArgMax/ArgMin, TopK. Opcodes: agent/convert/ops/reduce.py.
 *
 * Every kernel takes its extents from the input's run-time dims (a batched
 * tensor's dims[0] is only known at run time); the lowering refuses to reduce
 * along the batch axis, so the batch only ever multiplies the outer extent.
 */
#include <wasm_simd128.h>

#include "ea_math.h"
#include "ea_vmath.h"

enum {
  OP_REDUCE = 0,  /* iattr: kind (R_*), mask (bit i: input dim i is reduced) */
  OP_SOFTMAX = 1, /* iattr: mode (0 softmax, 1 log-softmax, 2 hardmax), axis, axis_end: along dims [axis, axis_end) */
  OP_ARG = 2,     /* iattr: axis, is_min, select_last_index; out int64 */
  OP_TOPK = 3,    /* iattr: axis, k, largest; out[0] values, out[1] int64 indices (sorted, ties: lower index first) */
};

/* Reduction kinds: agent/convert/ops/reduce.py KINDS. */
enum { R_SUM, R_MEAN, R_MAX, R_MIN, R_PROD, R_L1, R_L2, R_SUMSQ, R_LOGSUM, R_LOGSUMEXP };

/* ---- vector helpers ------------------------------------------------------ */

static inline v128_t vexp(v128_t x) { return ea_v_exp(x); }

static inline float hsum(v128_t v) {
  return (wasm_f32x4_extract_lane(v, 0) + wasm_f32x4_extract_lane(v, 1)) +
         (wasm_f32x4_extract_lane(v, 2) + wasm_f32x4_extract_lane(v, 3));
}
static inline float hmul(v128_t v) {
  return (wasm_f32x4_extract_lane(v, 0) * wasm_f32x4_extract_lane(v, 1)) *
         (wasm_f32x4_extract_lane(v, 2) * wasm_f32x4_extract_lane(v, 3));
}
/* max/min that ignore a NaN candidate but keep a NaN accumulator (as pmax/pmin do). */
static inline float smax(float a, float b) { return a < b ? b : a; }
static inline float smin(float a, float b) { return b < a ? b : a; }
static inline float hmax(v128_t v) {
  float r = wasm_f32x4_extract_lane(v, 0);
  r = smax(r, wasm_f32x4_extract_lane(v, 1));
  r = smax(r, wasm_f32x4_extract_lane(v, 2));
  return smax(r, wasm_f32x4_extract_lane(v, 3));
}
static inline float hmin(v128_t v) {
  float r = wasm_f32x4_extract_lane(v, 0);
  r = smin(r, wasm_f32x4_extract_lane(v, 1));
  r = smin(r, wasm_f32x4_extract_lane(v, 2));
  return smin(r, wasm_f32x4_extract_lane(v, 3));
}

/* ---- float reductions ------------------------------------------------------
 * A reduction is a per-element transform T and an associative combine C with
 * identity I. ROW reduces n contiguous elements to one value; VEC combines n
 * contiguous elements into n accumulators. */

#define V_ID(v) (v)
#define V_ABS(v) wasm_f32x4_abs(v)
#define V_SQ(v) wasm_f32x4_mul(v, v)
#define S_ID(v) (v)
#define S_ABS(v) fabsf(v)
#define S_SQ(v) ((v) * (v))
#define V_ADD(a, b) wasm_f32x4_add(a, b)
#define V_MUL(a, b) wasm_f32x4_mul(a, b)
#define V_MAX(a, b) wasm_f32x4_pmax(a, b)
#define V_MIN(a, b) wasm_f32x4_pmin(a, b)
#define S_ADD(a, b) ((a) + (b))
#define S_MUL(a, b) ((a) * (b))

#define DEF_FLOAT_REDUCTION(NAME, ID, VT, ST, VC, SC, HC)                                                          \
  static float row_##NAME(const float *x, int32_t n) {                                                             \
    v128_t a0 = wasm_f32x4_splat(ID), a1 = a0, a2 = a0, a3 = a0;                                                   \
    int32_t i = 0;                                                                                                 \
    for (; i + 16 <= n; i += 16) {                                                                                 \
      a0 = VC(a0, VT(wasm_v128_load(x + i)));                                                                      \
      a1 = VC(a1, VT(wasm_v128_load(x + i + 4)));                                                                  \
      a2 = VC(a2, VT(wasm_v128_load(x + i + 8)));                                                                  \
      a3 = VC(a3, VT(wasm_v128_load(x + i + 12)));                                                                 \
    }                                                                                                              \
    for (; i + 4 <= n; i += 4) a0 = VC(a0, VT(wasm_v128_load(x + i)));                                             \
    float r = HC(VC(VC(a0, a1), VC(a2, a3)));                                                                      \
    for (; i < n; i++) r = SC(r, ST(x[i]));                                                                        \
    return r;                                                                                                      \
  }                                                                                                                \
  static void vec_##NAME(float *acc, const float *x, int32_t n) {                                                  \
    int32_t i = 0;                                                                                                 \
    for (; i + 4 <= n; i += 4) wasm_v128_store(acc + i, VC(wasm_v128_load(acc + i), VT(wasm_v128_load(x + i)))); \
    for (; i < n; i++) acc[i] = SC(acc[i], ST(x[i]));                                                              \
  }

DEF_FLOAT_REDUCTION(sum, 0.0f, V_ID, S_ID, V_ADD, S_ADD, hsum)
DEF_FLOAT_REDUCTION(abs, 0.0f, V_ABS, S_ABS, V_ADD, S_ADD, hsum)
DEF_FLOAT_REDUCTION(sq, 0.0f, V_SQ, S_SQ, V_ADD, S_ADD, hsum)
DEF_FLOAT_REDUCTION(prod, 1.0f, V_ID, S_ID, V_MUL, S_MUL, hmul)
DEF_FLOAT_REDUCTION(max, -INFINITY, V_ID, S_ID, V_MAX, smax, hmax)
DEF_FLOAT_REDUCTION(min, INFINITY, V_ID, S_ID, V_MIN, smin, hmin)

/* sum of exp(x - shift) (log-sum-exp's second pass). */
static float row_sumexp(const float *x, int32_t n, float shift) {
  v128_t a0 = wasm_f32x4_splat(0.0f), a1 = a0, s = wasm_f32x4_splat(shift);
  int32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    a0 = wasm_f32x4_add(a0, vexp(wasm_f32x4_sub(wasm_v128_load(x + i), s)));
    a1 = wasm_f32x4_add(a1, vexp(wasm_f32x4_sub(wasm_v128_load(x + i + 4), s)));
  }
  for (; i + 4 <= n; i += 4) a0 = wasm_f32x4_add(a0, vexp(wasm_f32x4_sub(wasm_v128_load(x + i), s)));
  float r = hsum(wasm_f32x4_add(a0, a1));
  for (; i < n; i++) r += expf(x[i] - shift);
  return r;
}
static void vec_sumexp(float *acc, const float *x, int32_t n, const float *shift) {
  int32_t i = 0;
  for (; i + 4 <= n; i += 4)
    wasm_v128_store(acc + i, wasm_f32x4_add(wasm_v128_load(acc + i),
                                            vexp(wasm_f32x4_sub(wasm_v128_load(x + i), wasm_v128_load(shift + i)))));
  for (; i < n; i++) acc[i] += expf(x[i] - shift[i]);
}

/* The input's dims folded into alternating groups of kept and reduced dims (size-1 dims dropped). */
typedef struct {
  int32_t n;
  int32_t size[EA_MAX_RANK];
  int32_t red[EA_MAX_RANK];
  int32_t ostride[EA_MAX_RANK]; /* output stride (elements) of each group; 0 for reduced groups */
  int32_t reduced;              /* number of input elements per output element */
} groups_t;

static void make_groups(const ea_tensor_t *x, uint32_t mask, groups_t *g) {
  g->n = 0;
  g->reduced = 1;
  for (int32_t i = 0; i < x->rank; i++) {
    int32_t d = x->dims[i];
    int32_t r = (int32_t)((mask >> i) & 1u);
    if (r) g->reduced *= d;
    if (d == 1) continue;
    if (g->n > 0 && g->red[g->n - 1] == r) {
      g->size[g->n - 1] *= d;
    } else {
      g->size[g->n] = d;
      g->red[g->n] = r;
      g->n++;
    }
  }
  if (g->n == 0) {
    g->size[0] = 1;
    g->red[0] = 0;
    g->n = 1;
  }
  int32_t s = 1;
  for (int32_t i = g->n - 1; i >= 0; i--) {
    if (g->red[i]) {
      g->ostride[i] = 0;
    } else {
      g->ostride[i] = s;
      s *= g->size[i];
    }
  }
}

/*
 * Walk the input as rows of its last group: a reduced last group gives one
 * value per row (row_fn), a kept one a vector of accumulators (vec_fn). The
 * odometer over the other groups gives each row's output offset.
 */
typedef float (*row_fn)(const float *, int32_t);
typedef void (*vec_fn)(float *, const float *, int32_t);

static void walk_float(const groups_t *g, const float *x, int32_t count, float *out, row_fn row, vec_fn vec,
                       float (*comb)(float, float), const float *shift) {
  int32_t last = g->size[g->n - 1];
  int32_t last_red = g->red[g->n - 1];
  int32_t np = g->n - 1;
  int32_t idx[EA_MAX_RANK] = {0};
  int32_t o = 0;
  int32_t rows = count / last;
  for (int32_t p = 0; p < rows; p++) {
    const float *r = x + (size_t)p * (size_t)last;
    if (shift) {
      if (last_red) out[o] += row_sumexp(r, last, shift[o]);
      else vec_sumexp(out + o, r, last, shift + o);
    } else if (last_red) {
      out[o] = comb(out[o], row(r, last));
    } else {
      vec(out + o, r, last);
    }
    for (int32_t i = np - 1; i >= 0; i--) {
      o += g->ostride[i];
      if (++idx[i] < g->size[i]) break;
      o -= g->ostride[i] * g->size[i];
      idx[i] = 0;
    }
  }
}

static void fill_f32(float *p, int32_t n, float v) {
  for (int32_t i = 0; i < n; i++) p[i] = v;
}

static float s_add(float a, float b) { return a + b; }
static float s_mul(float a, float b) { return a * b; }

static int32_t reduce_f32(int32_t kind, const groups_t *g, const ea_tensor_t *x, ea_tensor_t *y) {
  float *out = y->data;
  const float *in = x->data;
  int32_t n = y->count;
  row_fn row = row_sum;
  vec_fn vec = vec_sum;
  float (*comb)(float, float) = s_add;
  float id = 0.0f;
  switch (kind) {
  case R_SUM: case R_MEAN: case R_LOGSUM: break;
  case R_L1: row = row_abs; vec = vec_abs; break;
  case R_L2: case R_SUMSQ: row = row_sq; vec = vec_sq; break;
  case R_PROD: row = row_prod; vec = vec_prod; comb = s_mul; id = 1.0f; break;
  case R_MAX: case R_LOGSUMEXP: row = row_max; vec = vec_max; comb = smax; id = -INFINITY; break;
  case R_MIN: row = row_min; vec = vec_min; comb = smin; id = INFINITY; break;
  default: return EA_ERR_INTERNAL;
  }
  fill_f32(out, n, id);
  if (x->count > 0) walk_float(g, in, x->count, out, row, vec, comb, 0);
  switch (kind) {
  case R_MEAN:
    if (g->reduced > 0) {
      float d = (float)g->reduced;
      for (int32_t i = 0; i < n; i++) out[i] /= d;
    }
    break;
  case R_L2: for (int32_t i = 0; i < n; i++) out[i] = sqrtf(out[i]); break;
  case R_LOGSUM: for (int32_t i = 0; i < n; i++) out[i] = logf(out[i]); break;
  case R_LOGSUMEXP: {
    float *shift = ea_scratch((uint32_t)n * 4u + 4u);
    if (!shift) return EA_ERR_NOMEM;
    for (int32_t i = 0; i < n; i++) {
      float m = out[i];
      shift[i] = (m - m == 0.0f) ? m : 0.0f; /* a finite max, else 0: all -inf gives log(0) = -inf */
      out[i] = 0.0f;
    }
    if (x->count > 0) walk_float(g, in, x->count, out, 0, 0, 0, shift);
    for (int32_t i = 0; i < n; i++) out[i] = shift[i] + logf(out[i]);
    break;
  }
  default: break;
  }
  return EA_OK;
}

/* ---- integer reductions (scalar; wrap-around arithmetic as ONNX runtimes do) ---- */

#define DEF_INT_REDUCE(T, UT, SUF, TMIN, TMAX)                                                                  \
  static inline T comb_##SUF(int32_t kind, T a, T v) {                                                          \
    switch (kind) {                                                                                             \
    case R_SUM: case R_MEAN: return (T)((UT)a + (UT)v);                                                         \
    case R_L1: return (T)((UT)a + (v < 0 ? (UT)0 - (UT)v : (UT)v));                                             \
    case R_SUMSQ: return (T)((UT)a + (UT)v * (UT)v);                                                            \
    case R_PROD: return (T)((UT)a * (UT)v);                                                                     \
    case R_MAX: return v > a ? v : a;                                                                           \
    default: return v < a ? v : a;                                                                              \
    }                                                                                                           \
  }                                                                                                             \
  static int32_t reduce_##SUF(int32_t kind, const groups_t *g, const ea_tensor_t *x, ea_tensor_t *y) {          \
    T *out = y->data;                                                                                           \
    const T *in = x->data;                                                                                      \
    T id = kind == R_PROD ? (T)1 : kind == R_MAX ? (T)(TMIN) : kind == R_MIN ? (T)(TMAX) : (T)0;                \
    for (int32_t i = 0; i < y->count; i++) out[i] = id;                                                         \
    int32_t last = g->size[g->n - 1], last_red = g->red[g->n - 1], np = g->n - 1;                               \
    int32_t idx[EA_MAX_RANK] = {0};                                                                             \
    int32_t o = 0, rows = x->count > 0 ? x->count / last : 0;                                                   \
    for (int32_t p = 0; p < rows; p++) {                                                                        \
      const T *r = in + (size_t)p * (size_t)last;                                                               \
      if (last_red) {                                                                                           \
        T a = out[o];                                                                                           \
        for (int32_t j = 0; j < last; j++) a = comb_##SUF(kind, a, r[j]);                                       \
        out[o] = a;                                                                                             \
      } else {                                                                                                  \
        for (int32_t j = 0; j < last; j++) out[o + j] = comb_##SUF(kind, out[o + j], r[j]);                     \
      }                                                                                                         \
      for (int32_t i = np - 1; i >= 0; i--) {                                                                   \
        o += g->ostride[i];                                                                                     \
        if (++idx[i] < g->size[i]) break;                                                                       \
        o -= g->ostride[i] * g->size[i];                                                                        \
        idx[i] = 0;                                                                                             \
      }                                                                                                         \
    }                                                                                                           \
    if (kind == R_MEAN && g->reduced > 0)                                                                       \
      for (int32_t i = 0; i < y->count; i++) out[i] = (T)(out[i] / (T)g->reduced);                              \
    return EA_OK;                                                                                               \
  }

DEF_INT_REDUCE(int32_t, uint32_t, i32, INT32_MIN, INT32_MAX)
DEF_INT_REDUCE(int64_t, uint64_t, i64, INT64_MIN, INT64_MAX)
DEF_INT_REDUCE(uint8_t, uint32_t, bool, 0, 1) /* bool: max = any, min = all */

static int32_t op_reduce(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  if (op->n_i < 2 || x->dtype != y->dtype) return EA_ERR_INTERNAL;
  int32_t kind = op->iattr[0];
  groups_t g;
  make_groups(x, (uint32_t)op->iattr[1], &g);
  if (y->count == 0) return EA_OK;
  if ((int64_t)y->count * g.reduced != x->count && x->count != 0) return EA_ERR_INTERNAL;
  switch (x->dtype) {
  case EA_F32: return reduce_f32(kind, &g, x, y);
  case EA_I32: return reduce_i32(kind, &g, x, y);
  case EA_I64: return reduce_i64(kind, &g, x, y);
  case EA_BOOL: return (kind == R_MAX || kind == R_MIN) ? reduce_bool(kind, &g, x, y) : EA_ERR_INTERNAL;
  default: return EA_ERR_INTERNAL;
  }
}

/* ---- Softmax, LogSoftmax, Hardmax ---------------------------------------- */

/* outer x n x inner extents of dims [0, a), [a, b), [b, rank). */
static void extents(const ea_tensor_t *x, int32_t a, int32_t b, int32_t *outer, int32_t *n, int32_t *inner) {
  int32_t o = 1, m = 1, r = 1;
  for (int32_t i = 0; i < x->rank; i++) {
    if (i < a) o *= x->dims[i];
    else if (i < b) m *= x->dims[i];
    else r *= x->dims[i];
  }
  *outer = o;
  *n = m;
  *inner = r;
}

static void softmax_row(const float *x, float *y, int32_t n, int32_t mode) {
  if (n <= 0) return;
  if (mode == 2) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
      if (x[i] > x[best]) best = i;
    fill_f32(y, n, 0.0f);
    y[best] = 1.0f;
    return;
  }
  float m = row_max(x, n);
  v128_t vm = wasm_f32x4_splat(m);
  int32_t i = 0;
  if (mode == 0) {
    v128_t a0 = wasm_f32x4_splat(0.0f), a1 = a0;
    for (; i + 8 <= n; i += 8) {
      v128_t e0 = vexp(wasm_f32x4_sub(wasm_v128_load(x + i), vm));
      v128_t e1 = vexp(wasm_f32x4_sub(wasm_v128_load(x + i + 4), vm));
      wasm_v128_store(y + i, e0);
      wasm_v128_store(y + i + 4, e1);
      a0 = wasm_f32x4_add(a0, e0);
      a1 = wasm_f32x4_add(a1, e1);
    }
    for (; i + 4 <= n; i += 4) {
      v128_t e = vexp(wasm_f32x4_sub(wasm_v128_load(x + i), vm));
      wasm_v128_store(y + i, e);
      a0 = wasm_f32x4_add(a0, e);
    }
    float s = hsum(wasm_f32x4_add(a0, a1));
    for (; i < n; i++) {
      y[i] = expf(x[i] - m);
      s += y[i];
    }
    float r = 1.0f / s;
    v128_t vr = wasm_f32x4_splat(r);
    for (i = 0; i + 4 <= n; i += 4) wasm_v128_store(y + i, wasm_f32x4_mul(wasm_v128_load(y + i), vr));
    for (; i < n; i++) y[i] *= r;
  } else {
    float l = logf(row_sumexp(x, n, m));
    v128_t vl = wasm_f32x4_splat(l);
    for (; i + 4 <= n; i += 4) wasm_v128_store(y + i, wasm_f32x4_sub(wasm_f32x4_sub(wasm_v128_load(x + i), vm), vl));
    for (; i < n; i++) y[i] = (x[i] - m) - l;
  }
}

/* Along a strided axis: n rows of inner contiguous elements, vectorised across the rows. */
static void softmax_strided(const float *x, float *y, int32_t n, int32_t inner, int32_t mode, float *m, float *s) {
  if (n <= 0) return;
  if (mode == 2) {
    fill_f32(y, n * inner, 0.0f);
    for (int32_t j = 0; j < inner; j++) {
      int32_t best = 0;
      for (int32_t i = 1; i < n; i++)
        if (x[(size_t)i * inner + j] > x[(size_t)best * inner + j]) best = i;
      y[(size_t)best * inner + j] = 1.0f;
    }
    return;
  }
  for (int32_t j = 0; j < inner; j++) {
    m[j] = x[j];
    s[j] = 0.0f;
  }
  for (int32_t i = 1; i < n; i++) vec_max(m, x + (size_t)i * inner, inner);
  int32_t j;
  for (int32_t i = 0; i < n; i++) {
    const float *xi = x + (size_t)i * inner;
    float *yi = y + (size_t)i * inner;
    for (j = 0; j + 4 <= inner; j += 4) {
      v128_t e = vexp(wasm_f32x4_sub(wasm_v128_load(xi + j), wasm_v128_load(m + j)));
      if (mode == 0) wasm_v128_store(yi + j, e);
      wasm_v128_store(s + j, wasm_f32x4_add(wasm_v128_load(s + j), e));
    }
    for (; j < inner; j++) {
      float e = expf(xi[j] - m[j]);
      if (mode == 0) yi[j] = e;
      s[j] += e;
    }
  }
  if (mode == 0) {
    for (j = 0; j < inner; j++) s[j] = 1.0f / s[j];
    for (int32_t i = 0; i < n; i++) {
      float *yi = y + (size_t)i * inner;
      for (j = 0; j + 4 <= inner; j += 4) wasm_v128_store(yi + j, wasm_f32x4_mul(wasm_v128_load(yi + j), wasm_v128_load(s + j)));
      for (; j < inner; j++) yi[j] *= s[j];
    }
  } else {
    for (j = 0; j < inner; j++) s[j] = logf(s[j]);
    for (int32_t i = 0; i < n; i++) {
      const float *xi = x + (size_t)i * inner;
      float *yi = y + (size_t)i * inner;
      for (j = 0; j + 4 <= inner; j += 4)
        wasm_v128_store(yi + j, wasm_f32x4_sub(wasm_f32x4_sub(wasm_v128_load(xi + j), wasm_v128_load(m + j)), wasm_v128_load(s + j)));
      for (; j < inner; j++) yi[j] = (xi[j] - m[j]) - s[j];
    }
  }
}

static int32_t op_softmax(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  if (op->n_i < 3 || x->dtype != EA_F32 || y->dtype != EA_F32 || x->count != y->count) return EA_ERR_INTERNAL;
  int32_t mode = op->iattr[0], outer, n, inner;
  extents(x, op->iattr[1], op->iattr[2], &outer, &n, &inner);
  const float *in = x->data;
  float *out = y->data;
  size_t line = (size_t)n * (size_t)inner;
  if (inner == 1) {
    for (int32_t o = 0; o < outer; o++) softmax_row(in + o * line, out + o * line, n, mode);
    return EA_OK;
  }
  float *m = ea_scratch((uint32_t)inner * 8u);
  if (!m) return EA_ERR_NOMEM;
  for (int32_t o = 0; o < outer; o++) softmax_strided(in + o * line, out + o * line, n, inner, mode, m, m + inner);
  return EA_OK;
}

/* ---- ArgMax, ArgMin ---------------------------------------------------------- */

#define DEF_ARG(T, SUF)                                                                                     \
  static void arg_##SUF(const T *x, int64_t *y, int32_t outer, int32_t n, int32_t inner, int32_t is_min,   \
                        int32_t last) {                                                                     \
    for (int32_t o = 0; o < outer; o++) {                                                                   \
      for (int32_t j = 0; j < inner; j++) {                                                                 \
        const T *p = x + (size_t)o * (size_t)n * (size_t)inner + j;                                         \
        T best = p[0];                                                                                      \
        int32_t bi = 0;                                                                                     \
        for (int32_t i = 1; i < n; i++) {                                                                   \
          T v = p[(size_t)i * inner];                                                                       \
          if ((is_min ? v < best : v > best) || (last && v == best)) {                                      \
            best = v;                                                                                       \
            bi = i;                                                                                         \
          }                                                                                                 \
        }                                                                                                   \
        y[(size_t)o * inner + j] = bi;                                                                      \
      }                                                                                                     \
    }                                                                                                       \
  }

DEF_ARG(float, f32)
DEF_ARG(int32_t, i32)
DEF_ARG(int64_t, i64)
DEF_ARG(uint8_t, u8)
DEF_ARG(int8_t, i8)

static int32_t op_arg(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  if (op->n_i < 3 || y->dtype != EA_I64) return EA_ERR_INTERNAL;
  int32_t axis = op->iattr[0], outer, n, inner;
  if (axis < 0 || axis >= x->rank) return EA_ERR_INTERNAL;
  extents(x, axis, axis + 1, &outer, &n, &inner);
  if ((int64_t)outer * inner != y->count || (n < 1 && y->count > 0)) return EA_ERR_INTERNAL;
  if (y->count == 0) return EA_OK;
  switch (x->dtype) {
  case EA_F32: arg_f32(x->data, y->data, outer, n, inner, op->iattr[1], op->iattr[2]); return EA_OK;
  case EA_I32: arg_i32(x->data, y->data, outer, n, inner, op->iattr[1], op->iattr[2]); return EA_OK;
  case EA_I64: arg_i64(x->data, y->data, outer, n, inner, op->iattr[1], op->iattr[2]); return EA_OK;
  case EA_U8: arg_u8(x->data, y->data, outer, n, inner, op->iattr[1], op->iattr[2]); return EA_OK;
  case EA_I8: arg_i8(x->data, y->data, outer, n, inner, op->iattr[1], op->iattr[2]); return EA_OK;
  default: return EA_ERR_INTERNAL;
  }
}

/* ---- TopK ------------------------------------------------------------------------
 * Per line: the k best of n as a sorted list of indices. Ties go to the lower
 * index; NaN counts as larger than any number (as onnxruntime orders them). */

#define F_GT(a, b) ((a) > (b) || ((a) != (a) && (b) == (b)))
#define I_GT(a, b) ((a) > (b))

#define DEF_TOPK(T, SUF, GT)                                                                                    \
  static inline int32_t better_##SUF(const T *v, int32_t a, int32_t b, int32_t largest) {                     \
    T va = v[a], vb = v[b];                                                                                     \
    if (largest) {                                                                                              \
      if (GT(va, vb)) return 1;                                                                                 \
      if (GT(vb, va)) return 0;                                                                                 \
    } else {                                                                                                    \
      if (GT(vb, va)) return 1;                                                                                 \
      if (GT(va, vb)) return 0;                                                                                 \
    }                                                                                                           \
    return a < b;                                                                                               \
  }                                                                                                             \
  static void topk_line_##SUF(const T *v, int32_t n, int32_t k, int32_t largest, int32_t *idx, int32_t *tmp) { \
    if (k <= 32) {                                                                                              \
      int32_t cnt = 0;                                                                                          \
      for (int32_t i = 0; i < n; i++) {                                                                         \
        if (cnt == k && !better_##SUF(v, i, idx[k - 1], largest)) continue;                                     \
        int32_t j = cnt < k ? cnt : k - 1;                                                                      \
        while (j > 0 && better_##SUF(v, i, idx[j - 1], largest)) {                                              \
          idx[j] = idx[j - 1];                                                                                  \
          j--;                                                                                                  \
        }                                                                                                       \
        idx[j] = i;                                                                                             \
        if (cnt < k) cnt++;                                                                                     \
      }                                                                                                         \
      return;                                                                                                   \
    }                                                                                                           \
    for (int32_t i = 0; i < n; i++) idx[i] = i;                                                                 \
    int32_t *src = idx, *dst = tmp;                                                                             \
    for (int32_t w = 1; w < n; w *= 2) {                                                                        \
      for (int32_t lo = 0; lo < n; lo += 2 * w) {                                                               \
        int32_t mid = EA_MIN(lo + w, n), hi = EA_MIN(lo + 2 * w, n), a = lo, b = mid, t = lo;                   \
        while (a < mid && b < hi) dst[t++] = better_##SUF(v, src[b], src[a], largest) ? src[b++] : src[a++];    \
        while (a < mid) dst[t++] = src[a++];                                                                    \
        while (b < hi) dst[t++] = src[b++];                                                                     \
      }                                                                                                         \
      int32_t *swap = src;                                                                                      \
      src = dst;                                                                                                \
      dst = swap;                                                                                               \
    }                                                                                                           \
    if (src != idx)                                                                                             \
      for (int32_t i = 0; i < k; i++) idx[i] = src[i];                                                          \
  }                                                                                                             \
  static int32_t topk_##SUF(const ea_tensor_t *x, ea_tensor_t *vals, ea_tensor_t *inds, int32_t outer,         \
                            int32_t n, int32_t inner, int32_t k, int32_t largest) {                             \
    unsigned char *scratch = ea_scratch((uint32_t)n * (uint32_t)(sizeof(T) + 8) + 16u);                         \
    if (!scratch) return EA_ERR_NOMEM;                                                                          \
    int32_t *idx = (int32_t *)scratch, *tmp = idx + n;                                                          \
    T *line = (T *)(void *)(tmp + n);                                                                           \
    const T *in = x->data;                                                                                      \
    T *ov = vals->data;                                                                                         \
    int64_t *oi = inds->data;                                                                                   \
    for (int32_t o = 0; o < outer; o++) {                                                                       \
      for (int32_t j = 0; j < inner; j++) {                                                                     \
        const T *base = in + (size_t)o * (size_t)n * (size_t)inner + j;                                         \
        const T *v = base;                                                                                      \
        if (inner > 1) {                                                                                        \
          for (int32_t i = 0; i < n; i++) line[i] = base[(size_t)i * inner];                                    \
          v = line;                                                                                             \
        }                                                                                                       \
        topk_line_##SUF(v, n, k, largest, idx, tmp);                                                            \
        size_t at = (size_t)o * (size_t)k * (size_t)inner + j;                                                  \
        for (int32_t t = 0; t < k; t++) {                                                                       \
          ov[at + (size_t)t * inner] = v[idx[t]];                                                               \
          oi[at + (size_t)t * inner] = idx[t];                                                                  \
        }                                                                                                       \
      }                                                                                                         \
    }                                                                                                           \
    return EA_OK;                                                                                               \
  }

DEF_TOPK(float, f32, F_GT)
DEF_TOPK(int32_t, i32, I_GT)
DEF_TOPK(int64_t, i64, I_GT)

static int32_t op_topk(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *vals = op->out[0], *inds = op->out[1];
  if (op->n_i < 3 || op->n_out < 2 || vals->dtype != x->dtype || inds->dtype != EA_I64) return EA_ERR_INTERNAL;
  int32_t axis = op->iattr[0], k = op->iattr[1], largest = op->iattr[2], outer, n, inner;
  if (axis < 0 || axis >= x->rank) return EA_ERR_INTERNAL;
  extents(x, axis, axis + 1, &outer, &n, &inner);
  if (k < 0 || k > n || (int64_t)outer * k * inner != vals->count || vals->count != inds->count) return EA_ERR_INTERNAL;
  if (vals->count == 0) return EA_OK;
  switch (x->dtype) {
  case EA_F32: return topk_f32(x, vals, inds, outer, n, inner, k, largest);
  case EA_I32: return topk_i32(x, vals, inds, outer, n, inner, k, largest);
  case EA_I64: return topk_i64(x, vals, inds, outer, n, inner, k, largest);
  default: return EA_ERR_INTERNAL;
  }
}

ea_kernel_fn ea_ops_reduce(uint32_t opcode) {
  switch (opcode & 63u) {
  case OP_REDUCE: return op_reduce;
  case OP_SOFTMAX: return op_softmax;
  case OP_ARG: return op_arg;
  case OP_TOPK: return op_topk;
  default: return 0;
  }
}
