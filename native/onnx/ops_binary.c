/*
 * ops_binary.c: the "binary" op family (plan.h): elementwise ops of two inputs (three for
 * Where) with multidirectional (numpy) broadcasting up to rank 8.
 * Opcodes: agent/convert/ops/binary.py (OPCODES), the B_* enum below.
 *
 * Broadcast strides come from the tensors' dims at run time (a batched tensor's dims[0]
 * changes with the batch), right-aligned. Axes of size 1 are dropped and neighbouring axes
 * that every input walks the same way are merged, so the common cases run as one loop:
 * same shapes (one contiguous row), a scalar operand (stride 0), a bias over the last axis
 * (outer loop over rows, contiguous inner rows) or over channels (inner scalar). The inner
 * row loops are plain C in three forms (both contiguous, one side constant) that clang
 * vectorises with SIMD128.
 *
 * Integer semantics follow onnxruntime: Div truncates toward zero, Mod with fmod=0 takes the
 * divisor's sign; division by zero gives 0 instead of trapping, and INT_MIN / -1 wraps.
 * Variadic Sum/Mean/Max/Min are chains of these ops (the lowering emits them).
 */
#include "ea_math.h"

enum {
  B_ADD = 0,
  B_SUB = 1,
  B_MUL = 2,
  B_DIV = 3,
  B_POW = 4,
  B_MAX = 5,
  B_MIN = 6,
  B_MOD = 7,  /* iattr[0]: fmod */
  B_PRELU = 8,
  B_EQUAL = 9,
  B_GREATER = 10,
  B_LESS = 11,
  B_GREATER_EQUAL = 12,
  B_LESS_EQUAL = 13,
  B_AND = 14,
  B_OR = 15,
  B_XOR = 16,
  B_WHERE = 17,
  B_BITWISE_AND = 18,
  B_BITWISE_OR = 19,
  B_BITWISE_XOR = 20,
  B_COUNT = 21,
};

/* One row: y[i] = f(a[i * sa], b[i * sb], c[i * sc]) for i < n; strides are 0 or 1. */
typedef void (*row_fn)(void *y, const void *a, const void *b, const void *c, int32_t n, int32_t sa, int32_t sb,
                       int32_t sc, const ea_op_t *op);

typedef struct {
  int32_t rank;
  int32_t dims[EA_MAX_RANK];
  int32_t st[3][EA_MAX_RANK];
} bcast_t;

/* Broadcast strides of n_in inputs against out's dims, axes of size 1 dropped, mergeable axes merged. */
static int32_t bcast_init(bcast_t *b, const ea_tensor_t *out, const ea_tensor_t *const *in, int32_t n_in) {
  int32_t r = out->rank;
  int32_t cstride[3][EA_MAX_RANK];
  int32_t rank[3] = {0, 0, 0}, skip[3] = {0, 0, 0};
  for (int32_t k = 0; k < n_in; k++) {
    /* An operand of higher rank than the output whose extra leading axes are all 1 (a rank-0
     * constant stored as shape (1,), say) broadcasts as the output-rank tail of itself. */
    skip[k] = in[k]->rank > r ? in[k]->rank - r : 0;
    for (int32_t j = 0; j < skip[k]; j++)
      if (in[k]->dims[j] != 1) return EA_ERR_INTERNAL;
    rank[k] = in[k]->rank - skip[k];
    int32_t s = 1;
    for (int32_t j = rank[k] - 1; j >= 0; j--) {
      cstride[k][j] = s;
      s *= in[k]->dims[skip[k] + j];
    }
  }
  b->rank = 0;
  for (int32_t i = 0; i < r; i++) {
    int32_t od = out->dims[i];
    int32_t st[3];
    for (int32_t k = 0; k < n_in; k++) {
      int32_t j = i - (r - rank[k]);
      int32_t d = j < 0 ? 1 : in[k]->dims[skip[k] + j];
      if (d == od && j >= 0) st[k] = cstride[k][j];
      else if (d == 1) st[k] = 0;
      else return EA_ERR_INTERNAL;
    }
    if (od == 1) continue;
    int32_t p = b->rank - 1, merge = p >= 0;
    for (int32_t k = 0; k < n_in && merge; k++) merge = b->st[k][p] == st[k] * od;
    if (merge) {
      b->dims[p] *= od;
      for (int32_t k = 0; k < n_in; k++) b->st[k][p] = st[k];
    } else {
      b->dims[b->rank] = od;
      for (int32_t k = 0; k < n_in; k++) b->st[k][b->rank] = st[k];
      b->rank++;
    }
  }
  if (b->rank == 0) {
    b->rank = 1;
    b->dims[0] = 1;
    for (int32_t k = 0; k < n_in; k++) b->st[k][0] = 0;
  }
  return EA_OK;
}

static int32_t bcast_run(const ea_op_t *op, int32_t n_in, row_fn fn) {
  ea_tensor_t *out = op->out[0];
  if (out->count == 0) return EA_OK;
  const ea_tensor_t *in[3] = {op->in[0], n_in > 1 ? op->in[1] : 0, n_in > 2 ? op->in[2] : 0};
  for (int32_t k = 0; k < n_in; k++)
    if (!in[k]) return EA_ERR_INTERNAL;
  bcast_t b;
  int32_t status = bcast_init(&b, out, in, n_in);
  if (status != EA_OK) return status;
  int32_t r = b.rank, inner = b.dims[r - 1];
  int32_t ey = ea_dtype_size(out->dtype), es[3] = {0, 0, 0};
  const unsigned char *src[3] = {0, 0, 0};
  for (int32_t k = 0; k < n_in; k++) {
    es[k] = ea_dtype_size(in[k]->dtype);
    src[k] = in[k]->data;
  }
  int32_t s[3] = {b.st[0][r - 1], n_in > 1 ? b.st[1][r - 1] : 0, n_in > 2 ? b.st[2][r - 1] : 0};
  int32_t outer = out->count / inner;
  int32_t idx[EA_MAX_RANK] = {0};
  int32_t off[3] = {0, 0, 0};
  unsigned char *y = out->data;
  for (int32_t o = 0; o < outer; o++) {
    fn(y + (size_t)o * inner * ey, src[0] + (size_t)off[0] * es[0], src[1] + (size_t)off[1] * es[1],
       src[2] + (size_t)off[2] * es[2], inner, s[0], s[1], s[2], op);
    for (int32_t d = r - 2; d >= 0; d--) {
      for (int32_t k = 0; k < n_in; k++) off[k] += b.st[k][d];
      if (++idx[d] < b.dims[d]) break;
      for (int32_t k = 0; k < n_in; k++) off[k] -= b.st[k][d] * b.dims[d];
      idx[d] = 0;
    }
  }
  return EA_OK;
}

/* A row function from an expression of `a` and `b`; the three stride forms are separate loops
 * so that clang vectorises them. */
#define ROW2(NAME, TA, TB, TY, EXPR)                                                                  \
  static void NAME(void *yv, const void *av, const void *bv, const void *cv, int32_t n, int32_t sa,   \
                   int32_t sb, int32_t sc, const ea_op_t *op) {                                       \
    (void)cv;                                                                                         \
    (void)sc;                                                                                         \
    (void)op;                                                                                         \
    TY *y = yv;                                                                                       \
    const TA *pa = av;                                                                                \
    const TB *pb = bv;                                                                                \
    if (sa && sb) {                                                                                   \
      for (int32_t i = 0; i < n; i++) {                                                               \
        TA a = pa[i];                                                                                 \
        TB b = pb[i];                                                                                 \
        y[i] = (TY)(EXPR);                                                                            \
      }                                                                                               \
    } else if (sb) {                                                                                  \
      TA a = pa[0];                                                                                   \
      for (int32_t i = 0; i < n; i++) {                                                               \
        TB b = pb[i];                                                                                 \
        y[i] = (TY)(EXPR);                                                                            \
      }                                                                                               \
    } else if (sa) {                                                                                  \
      TB b = pb[0];                                                                                   \
      for (int32_t i = 0; i < n; i++) {                                                               \
        TA a = pa[i];                                                                                 \
        y[i] = (TY)(EXPR);                                                                            \
      }                                                                                               \
    } else {                                                                                          \
      TA a = pa[0];                                                                                   \
      TB b = pb[0];                                                                                   \
      TY v = (TY)(EXPR);                                                                              \
      for (int32_t i = 0; i < n; i++) y[i] = v;                                                       \
    }                                                                                                 \
  }

/* ---- float32 ------------------------------------------------------------------------------- */
ROW2(add_f32, float, float, float, a + b)
ROW2(sub_f32, float, float, float, a - b)
ROW2(mul_f32, float, float, float, a *b)
ROW2(div_f32, float, float, float, a / b)
ROW2(max_f32, float, float, float, __builtin_wasm_max_f32(a, b)) /* NaN propagates */
ROW2(min_f32, float, float, float, __builtin_wasm_min_f32(a, b))
ROW2(fmod_f32, float, float, float, fmodf(a, b))
/* Mod with fmod=0 on floats (opset 28): the divisor's sign, as numpy.mod / Python's %. */
static float pymod_f32(float a, float b) {
  float m = fmodf(a, b);
  if (b == 0.0f) return m; /* NaN */
  if (m != 0.0f) return ((b < 0.0f) != (m < 0.0f)) ? m + b : m;
  return copysignf(0.0f, b);
}
ROW2(mod_f32, float, float, float, pymod_f32(a, b))
ROW2(prelu_f32, float, float, float, a < 0.0f ? a * b : a)
ROW2(eq_f32, float, float, uint8_t, a == b)
ROW2(gt_f32, float, float, uint8_t, a > b)
ROW2(lt_f32, float, float, uint8_t, a < b)
ROW2(ge_f32, float, float, uint8_t, a >= b)
ROW2(le_f32, float, float, uint8_t, a <= b)

static float pow_f32(float a, float b) {
  if (b == 2.0f) return a * a; /* the correctly rounded square, as powf gives it */
  if (b == 1.0f) return a;
  return powf(a, b);
}
ROW2(pow_f32_f32, float, float, float, pow_f32(a, b))
ROW2(pow_f32_i32, float, int32_t, float, pow_f32(a, (float)b))
ROW2(pow_f32_i64, float, int64_t, float, pow_f32(a, (float)b))

/* ---- integers ------------------------------------------------------------------------------ */
static int64_t sat_i64(double v) {
  if (v != v) return 0;
  if (v >= 9.2233720368547758e18) return INT64_MAX;
  if (v <= -9.2233720368547758e18) return INT64_MIN;
  return (int64_t)v;
}

/* base^e in wrapping integer arithmetic; negative e as onnxruntime's (T)pow(): 0 unless |base| = 1. */
static int64_t ipow(int64_t base, int64_t e) {
  if (e < 0) return base == 1 ? 1 : (base == -1 ? ((e & 1) ? -1 : 1) : 0);
  uint64_t r = 1, x = (uint64_t)base;
  while (e) {
    if (e & 1) r *= x;
    x *= x;
    e >>= 1;
  }
  return (int64_t)r;
}

/* Truncating division and modulo that never trap: x / 0 = 0, x % 0 = 0, MIN / -1 wraps. */
#define INT_HELPERS(T, U)                                                                       \
  static inline T idiv_##T(T a, T b) {                                                          \
    if (b == 0) return 0;                                                                       \
    if ((T)(b + 1) == 0 && (T)-1 < 0) return (T)(U)(0u - (U)a);                                 \
    return (T)(a / b);                                                                          \
  }                                                                                             \
  static inline T imod_##T(T a, T b) { /* sign of the divisor (fmod = 0) */                     \
    if (b == 0 || ((T)(b + 1) == 0 && (T)-1 < 0)) return 0;                                     \
    T r = (T)(a % b);                                                                           \
    if (r != 0 && ((r < 0) != (b < 0))) r = (T)(r + b);                                         \
    return r;                                                                                   \
  }                                                                                             \
  static inline T ifmod_##T(T a, T b) { /* sign of the dividend (fmod = 1) */                   \
    if (b == 0 || ((T)(b + 1) == 0 && (T)-1 < 0)) return 0;                                     \
    return (T)(a % b);                                                                          \
  }

INT_HELPERS(int32_t, uint32_t)
INT_HELPERS(int64_t, uint64_t)
INT_HELPERS(int8_t, uint8_t)
INT_HELPERS(uint8_t, uint8_t)

#define INT_ROWS(T, U)                                                                          \
  ROW2(add_##T, T, T, T, (U)a + (U)b)                                                           \
  ROW2(sub_##T, T, T, T, (U)a - (U)b)                                                           \
  ROW2(mul_##T, T, T, T, (U)a *(U)b)                                                            \
  ROW2(div_##T, T, T, T, idiv_##T(a, b))                                                        \
  ROW2(mod_##T, T, T, T, imod_##T(a, b))                                                        \
  ROW2(fmod_##T, T, T, T, ifmod_##T(a, b))                                                      \
  ROW2(max_##T, T, T, T, a > b ? a : b)                                                         \
  ROW2(min_##T, T, T, T, a < b ? a : b)                                                         \
  ROW2(prelu_##T, T, T, T, a < 0 ? (U)a * (U)b : (U)a)                                          \
  ROW2(eq_##T, T, T, uint8_t, a == b)                                                           \
  ROW2(gt_##T, T, T, uint8_t, a > b)                                                            \
  ROW2(lt_##T, T, T, uint8_t, a < b)                                                            \
  ROW2(ge_##T, T, T, uint8_t, a >= b)                                                           \
  ROW2(le_##T, T, T, uint8_t, a <= b)                                                           \
  ROW2(band_##T, T, T, T, (U)a & (U)b)                                                          \
  ROW2(bor_##T, T, T, T, (U)a | (U)b)                                                           \
  ROW2(bxor_##T, T, T, T, (U)a ^ (U)b)

/* Integer bases (int32, int64): exact powers for integer exponents, (T)pow() for float ones. */
#define POW_ROWS(T)                                                                             \
  ROW2(pow_##T##_i32, T, int32_t, T, ipow(a, b))                                                \
  ROW2(pow_##T##_i64, T, int64_t, T, ipow(a, b))                                                \
  ROW2(pow_##T##_f32, T, float, T, sat_i64(pow((double)a, (double)b)))

#if defined(__clang__)
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wtype-limits"
#pragma clang diagnostic ignored "-Wtautological-unsigned-zero-compare"
#endif
INT_ROWS(int32_t, uint32_t)
INT_ROWS(int64_t, uint64_t)
INT_ROWS(int8_t, uint8_t)
INT_ROWS(uint8_t, uint8_t)
POW_ROWS(int32_t)
POW_ROWS(int64_t)
#if defined(__clang__)
#pragma clang diagnostic pop
#endif

/* ---- bool ---------------------------------------------------------------------------------- */
ROW2(and_b, uint8_t, uint8_t, uint8_t, (a != 0) & (b != 0))
ROW2(or_b, uint8_t, uint8_t, uint8_t, (a != 0) | (b != 0))
ROW2(xor_b, uint8_t, uint8_t, uint8_t, (a != 0) ^ (b != 0))
ROW2(eq_b, uint8_t, uint8_t, uint8_t, (a != 0) == (b != 0))

/* ---- Where: y = cond ? x : z, by element size --------------------------------------------- */
#define WHERE_ROW(NAME, T)                                                                      \
  static void NAME(void *yv, const void *cv, const void *xv, const void *zv, int32_t n, int32_t sc, \
                   int32_t sx, int32_t sz, const ea_op_t *op) {                                 \
    (void)op;                                                                                   \
    T *y = yv;                                                                                  \
    const uint8_t *c = cv;                                                                      \
    const T *x = xv, *z = zv;                                                                   \
    if (sc && sx && sz) {                                                                       \
      for (int32_t i = 0; i < n; i++) y[i] = c[i] ? x[i] : z[i];                                \
    } else {                                                                                    \
      for (int32_t i = 0; i < n; i++) y[i] = c[i * sc] ? x[i * sx] : z[i * sz];                 \
    }                                                                                           \
  }
WHERE_ROW(where_1, uint8_t)
WHERE_ROW(where_4, uint32_t)
WHERE_ROW(where_8, uint64_t)

/* The row function of (code, element types), 0 when there is none. */
static row_fn pick(int32_t code, int32_t ta, int32_t tb, int32_t fmod_flag) {
#define BY_INT(PREFIX)                                                                          \
  switch (ta) {                                                                                 \
  case EA_I32: return PREFIX##int32_t;                                                          \
  case EA_I64: return PREFIX##int64_t;                                                          \
  case EA_I8: return PREFIX##int8_t;                                                            \
  case EA_U8: return PREFIX##uint8_t;                                                           \
  default: return 0;                                                                            \
  }
#define NUM(F32, PREFIX)                                                                        \
  if (ta != tb) return 0;                                                                       \
  if (ta == EA_F32) return F32;                                                                 \
  BY_INT(PREFIX)
  switch (code) {
  case B_ADD: NUM(add_f32, add_)
  case B_SUB: NUM(sub_f32, sub_)
  case B_MUL: NUM(mul_f32, mul_)
  case B_DIV: NUM(div_f32, div_)
  case B_MAX: NUM(max_f32, max_)
  case B_MIN: NUM(min_f32, min_)
  case B_PRELU: NUM(prelu_f32, prelu_)
  case B_GREATER: NUM(gt_f32, gt_)
  case B_LESS: NUM(lt_f32, lt_)
  case B_GREATER_EQUAL: NUM(ge_f32, ge_)
  case B_LESS_EQUAL: NUM(le_f32, le_)
  case B_EQUAL:
    if (ta == EA_BOOL && tb == EA_BOOL) return eq_b;
    NUM(eq_f32, eq_)
  case B_MOD:
    if (ta != tb) return 0;
    if (ta == EA_F32) return fmod_flag ? fmod_f32 : mod_f32;
    if (fmod_flag) {
      BY_INT(fmod_)
    } else {
      BY_INT(mod_)
    }
  case B_BITWISE_AND:
    if (ta != tb) return 0;
    BY_INT(band_)
  case B_BITWISE_OR:
    if (ta != tb) return 0;
    BY_INT(bor_)
  case B_BITWISE_XOR:
    if (ta != tb) return 0;
    BY_INT(bxor_)
  case B_AND: return ta == EA_BOOL && tb == EA_BOOL ? and_b : 0;
  case B_OR: return ta == EA_BOOL && tb == EA_BOOL ? or_b : 0;
  case B_XOR: return ta == EA_BOOL && tb == EA_BOOL ? xor_b : 0;
  case B_POW:
    switch (ta) {
    case EA_F32: return tb == EA_F32 ? pow_f32_f32 : tb == EA_I32 ? pow_f32_i32 : tb == EA_I64 ? pow_f32_i64 : 0;
    case EA_I32:
      return tb == EA_F32 ? pow_int32_t_f32 : tb == EA_I32 ? pow_int32_t_i32 : tb == EA_I64 ? pow_int32_t_i64 : 0;
    case EA_I64:
      return tb == EA_F32 ? pow_int64_t_f32 : tb == EA_I32 ? pow_int64_t_i32 : tb == EA_I64 ? pow_int64_t_i64 : 0;
    default: return 0;
    }
  default: return 0;
  }
#undef NUM
#undef BY_INT
}

static int32_t op_binary(const ea_op_t *op) {
  int32_t code = (int32_t)(op->opcode & 63u);
  if (op->n_in < 2 || !op->in[0] || !op->in[1]) return EA_ERR_INTERNAL;
  row_fn fn = pick(code, op->in[0]->dtype, op->in[1]->dtype, op->n_i > 0 ? op->iattr[0] : 0);
  if (!fn) return EA_ERR_INTERNAL;
  return bcast_run(op, 2, fn);
}

static int32_t op_where(const ea_op_t *op) {
  if (op->n_in < 3 || !op->in[0] || !op->in[1] || !op->in[2]) return EA_ERR_INTERNAL;
  int32_t size = ea_dtype_size(op->out[0]->dtype);
  if (op->in[0]->dtype != EA_BOOL || op->in[1]->dtype != op->out[0]->dtype || op->in[2]->dtype != op->out[0]->dtype)
    return EA_ERR_INTERNAL;
  row_fn fn = size == 1 ? where_1 : size == 4 ? where_4 : size == 8 ? where_8 : 0;
  return fn ? bcast_run(op, 3, fn) : EA_ERR_INTERNAL;
}

ea_kernel_fn ea_ops_binary(uint32_t opcode) {
  uint32_t code = opcode & 63u;
  if (code == B_WHERE) return op_where;
  return code < B_COUNT ? op_binary : 0;
}
