/*
 * ops_ml.c: the "ml" op family (plan.h): the ai.onnx.ml ops of scikit-learn models.
 * Opcodes, and how each ONNX op maps onto these kernels: agent/convert/ops/ml.py.
 *
 * The arithmetic follows onnxruntime's CPU kernels, the converter's reference:
 * float32 throughout, trees summed in onnxruntime's order (tree by tree), and its
 * post-transforms (logistic, softmax, softmax-zero, and its probit approximation).
 */
#include "ea_math.h"

#include <float.h>
#include <wasm_simd128.h>

enum {
  OP_SCALER = 0,                  /* y = (x - offset[c]) * scale[c], c = i % stride */
  OP_NORMALIZER = 1,              /* per row: MAX, L1 or L2 (iattr[0]) */
  OP_LINEAR = 2,                  /* LinearClassifier (labels + scores) and LinearRegressor */
  OP_TREES = 3,                   /* TreeEnsembleClassifier / TreeEnsembleRegressor / TreeEnsemble */
  OP_ARRAY_FEATURE_EXTRACTOR = 4, /* z[..., j] = x[..., idx[j]] */
  OP_BINARIZER = 5,               /* y = x > threshold ? 1 : 0 */
};

enum { POST_NONE = 0, POST_LOGISTIC = 1, POST_SOFTMAX = 2, POST_SOFTMAX_ZERO = 3, POST_PROBIT = 4 };
enum { AGG_AVERAGE = 0, AGG_SUM = 1, AGG_MIN = 2, AGG_MAX = 3 };
enum { TREE_REGRESSOR_1 = 0, TREE_REGRESSOR_N = 1, TREE_CLASSIFIER = 2 };

/* Element i of a float32, int32 or int64 tensor, as float (C's conversion, as onnxruntime's static_cast). */
static inline float ml_load(const ea_tensor_t *t, int32_t i) {
  switch (t->dtype) {
  case EA_F32: return ((const float *)t->data)[i];
  case EA_I32: return (float)((const int32_t *)t->data)[i];
  case EA_I64: return (float)((const int64_t *)t->data)[i];
  default: return 0.f;
  }
}

static int ml_numeric(int32_t dtype) { return dtype == EA_F32 || dtype == EA_I32 || dtype == EA_I64; }

/* -- post-transforms (onnxruntime ml_common.h) -------------------------------------- */

static inline float ml_logistic(float v) {
  float e = 1.f / (1.f + expf(-fabsf(v)));
  return v < 0 ? 1.f - e : e;
}

/* onnxruntime's ErfInv: Winitzki's approximation (a = 0.147), in float. */
static inline float ml_erfinv(float x) {
  float sgn = x < 0 ? -1.0f : 1.0f;
  x = (1 - x) * (1 + x);
  float lg = logf(x);
  float v = 2 / (3.14159265358979323846f * 0.147f) + 0.5f * lg;
  float v2 = 1 / (0.147f) * lg;
  float v3 = -v + sqrtf(v * v - v2);
  return sgn * sqrtf(v3);
}

static inline float ml_probit(float v) { return 1.41421356237309504880f * ml_erfinv(2 * v - 1); }

static void ml_softmax(float *s, int32_t n) {
  float vmax = -FLT_MAX;
  for (int32_t i = 0; i < n; i++)
    if (s[i] > vmax) vmax = s[i];
  float sum = 0.f;
  for (int32_t i = 0; i < n; i++) {
    s[i] = expf(s[i] - vmax);
    sum += s[i];
  }
  for (int32_t i = 0; i < n; i++) s[i] = s[i] / sum;
}

/* Softmax that leaves (near-)zero scores out of the sum. */
static void ml_softmax_zero(float *s, int32_t n) {
  float vmax = -FLT_MAX;
  for (int32_t i = 0; i < n; i++)
    if (s[i] > vmax) vmax = s[i];
  float exp_neg_vmax = expf(-vmax);
  float sum = 0.f;
  for (int32_t i = 0; i < n; i++) {
    if (s[i] > 0.0000001f || s[i] < -0.0000001f) {
      s[i] = expf(s[i] - vmax);
      sum += s[i];
    } else {
      s[i] = s[i] * exp_neg_vmax;
    }
  }
  for (int32_t i = 0; i < n; i++) s[i] = s[i] / sum;
}

/* The transform of two or more scores (write_scores / batched_update_scores_inplace). */
static void ml_post(float *s, int32_t n, int32_t post) {
  switch (post) {
  case POST_PROBIT:
    for (int32_t i = 0; i < n; i++) s[i] = ml_probit(s[i]);
    break;
  case POST_LOGISTIC:
    for (int32_t i = 0; i < n; i++) s[i] = ml_logistic(s[i]);
    break;
  case POST_SOFTMAX: ml_softmax(s, n); break;
  case POST_SOFTMAX_ZERO: ml_softmax_zero(s, n); break;
  default: break;
  }
}

/* -- Scaler, Normalizer, Binarizer ---------------------------------------------------- */

/* in: x, offset[L], scale[L] (L = 1 or the stride); out: float. */
static int32_t op_scaler(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  const float *off = op->in[1]->data, *sc = op->in[2]->data;
  int32_t len = op->in[1]->count;
  float *y = op->out[0]->data;
  int32_t n = x->count;
  if (x->rank < 1 || !ml_numeric(x->dtype) || op->out[0]->count != n) return EA_ERR_INTERNAL;
  int32_t stride = x->rank == 1 ? x->dims[0] : x->dims[1];
  if (len == 1) {
    float o = off[0], s = sc[0];
    if (x->dtype == EA_F32) {
      const float *xs = x->data;
      for (int32_t i = 0; i < n; i++) y[i] = (xs[i] - o) * s;
    } else {
      for (int32_t i = 0; i < n; i++) y[i] = (ml_load(x, i) - o) * s;
    }
    return EA_OK;
  }
  if (len != stride || stride <= 0) return EA_ERR_INTERNAL;
  for (int32_t base = 0; base < n; base += stride) {
    if (x->dtype == EA_F32) {
      const float *xs = (const float *)x->data + base;
      for (int32_t c = 0; c < stride; c++) y[base + c] = (xs[c] - off[c]) * sc[c];
    } else {
      for (int32_t c = 0; c < stride; c++) y[base + c] = (ml_load(x, base + c) - off[c]) * sc[c];
    }
  }
  return EA_OK;
}

/* iattr[0]: 0 MAX, 1 L1, 2 L2. Rows of the last dimension of a rank-1 or rank-2 input. */
static int32_t op_normalizer(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  float *y = op->out[0]->data;
  int32_t mode = op->iattr[0];
  if (x->rank < 1 || x->rank > 2 || !ml_numeric(x->dtype)) return EA_ERR_INTERNAL;
  int32_t rows = x->rank == 1 ? 1 : x->dims[0];
  int32_t cols = x->rank == 1 ? x->dims[0] : x->dims[1];
  for (int32_t r = 0; r < rows; r++) {
    int32_t b = r * cols;
    float *o = y + b;
    if (mode == 0) {
      float m = -FLT_MAX;
      for (int32_t i = 0; i < cols; i++) {
        float v = ml_load(x, b + i);
        if (m < v) m = v; /* std::max(m, v): NaN never wins */
      }
      for (int32_t i = 0; i < cols; i++) o[i] = m != 0.f ? ml_load(x, b + i) / m : ml_load(x, b + i);
    } else if (mode == 1) {
      float sum = 0.f;
      for (int32_t i = 0; i < cols; i++) sum += fabsf(ml_load(x, b + i));
      for (int32_t i = 0; i < cols; i++) o[i] = sum != 0.f ? ml_load(x, b + i) / sum : ml_load(x, b + i);
    } else {
      float sum = 0.f;
      for (int32_t i = 0; i < cols; i++) {
        float v = ml_load(x, b + i);
        o[i] = v * v;
        sum += o[i];
      }
      if (sum != 0.f) {
        for (int32_t i = 0; i < cols; i++) {
          float r2 = sqrtf(o[i] / sum);
          o[i] = ml_load(x, b + i) < 0 ? r2 * -1 : r2;
        }
      } else {
        for (int32_t i = 0; i < cols; i++) o[i] = ml_load(x, b + i);
      }
    }
  }
  return EA_OK;
}

/* fattr[0]: threshold. Output has the input's type: 1 where x > threshold, else 0 (NaN: 0). */
static int32_t op_binarizer(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  float t = op->fattr[0];
  int32_t n = x->count;
  if (x->dtype != y->dtype || n != y->count) return EA_ERR_INTERNAL;
  switch (x->dtype) {
  case EA_F32: {
    const float *xs = x->data;
    float *o = y->data;
    for (int32_t i = 0; i < n; i++) o[i] = xs[i] > t ? 1.f : 0.f;
    return EA_OK;
  }
  case EA_I32: {
    const int32_t *xs = x->data;
    int32_t *o = y->data;
    for (int32_t i = 0; i < n; i++) o[i] = (double)xs[i] > (double)t ? 1 : 0;
    return EA_OK;
  }
  case EA_I64: {
    const int64_t *xs = x->data;
    int64_t *o = y->data;
    for (int32_t i = 0; i < n; i++) o[i] = (double)xs[i] > (double)t ? 1 : 0;
    return EA_OK;
  }
  default: return EA_ERR_INTERNAL;
  }
}

/* -- ArrayFeatureExtractor ------------------------------------------------------------ */

/* in: x (any dtype), idx int64; out: x's rows (all but the last dimension) at the indices. */
static int32_t op_array_feature_extractor(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0], *ix = op->in[1];
  ea_tensor_t *z = op->out[0];
  int32_t esize = ea_dtype_size(x->dtype);
  if (x->rank < 1 || esize == 0 || z->dtype != x->dtype || ix->dtype != EA_I64) return EA_ERR_INTERNAL;
  int32_t stride = x->dims[x->rank - 1];
  int32_t k = ix->count;
  const int64_t *idx = ix->data;
  if (stride <= 0) return EA_ERR_INTERNAL;
  int32_t rows = x->count / stride;
  if (z->count != rows * k) return EA_ERR_INTERNAL;
  for (int32_t j = 0; j < k; j++)
    if (idx[j] < 0 || idx[j] >= stride) return EA_ERR_INPUT; /* onnxruntime: "index is out of range" */
  const unsigned char *xs = x->data;
  unsigned char *o = z->data;
  for (int32_t r = 0; r < rows; r++) {
    const unsigned char *row = xs + (size_t)r * stride * esize;
    unsigned char *out = o + (size_t)r * k * esize;
    switch (esize) {
    case 4:
      for (int32_t j = 0; j < k; j++) ((uint32_t *)out)[j] = ((const uint32_t *)row)[idx[j]];
      break;
    case 8:
      for (int32_t j = 0; j < k; j++) ((uint64_t *)out)[j] = ((const uint64_t *)row)[idx[j]];
      break;
    default:
      for (int32_t j = 0; j < k; j++) memcpy(out + (size_t)j * esize, row + (size_t)idx[j] * esize, (size_t)esize);
      break;
    }
  }
  return EA_OK;
}

/* -- linear models ------------------------------------------------------------------- */

static inline float ml_dot(const float *a, const float *b, int32_t n) {
  v128_t s0 = wasm_f32x4_splat(0.f), s1 = s0;
  int32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    s0 = wasm_f32x4_add(s0, wasm_f32x4_mul(wasm_v128_load(a + i), wasm_v128_load(b + i)));
    s1 = wasm_f32x4_add(s1, wasm_f32x4_mul(wasm_v128_load(a + i + 4), wasm_v128_load(b + i + 4)));
  }
  if (i + 4 <= n) {
    s0 = wasm_f32x4_add(s0, wasm_f32x4_mul(wasm_v128_load(a + i), wasm_v128_load(b + i)));
    i += 4;
  }
  s0 = wasm_f32x4_add(s0, s1);
  float sum = (wasm_f32x4_extract_lane(s0, 0) + wasm_f32x4_extract_lane(s0, 1)) +
              (wasm_f32x4_extract_lane(s0, 2) + wasm_f32x4_extract_lane(s0, 3));
  for (; i < n; i++) sum += a[i] * b[i];
  return sum;
}

/*
 * in: x [N,F] or [F] (float32/int32/int64), W [C,F], b [C] (absent: none), labels int64 (classifier).
 * out: classifier: labels int64 [N], scores [N, C or 2]; regressor: scores [N, C].
 * iattr: classifier?, C, F, post-transform, add a second score column (one class, two labels).
 */
static int32_t op_linear(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  const float *w = op->in[1]->data;
  const float *b = op->in[2] ? (const float *)op->in[2]->data : 0;
  int32_t cls = op->iattr[0], C = op->iattr[1], F = op->iattr[2], post = op->iattr[3], second = op->iattr[4];
  int32_t N = x->rank <= 1 ? 1 : x->dims[0];
  if (x->count != N * F || !ml_numeric(x->dtype) || C < 1) return EA_ERR_INTERNAL;
  const int64_t *labels = cls ? (const int64_t *)op->in[3]->data : 0;
  int64_t *y = cls ? (int64_t *)op->out[0]->data : 0;
  float *z = cls ? (float *)op->out[1]->data : (float *)op->out[0]->data;
  int32_t zc = second ? 2 : C;
  float *row = 0;
  if (x->dtype != EA_F32) {
    row = ea_scratch((uint32_t)F * 4u + 16u);
    if (!row) return EA_ERR_NOMEM;
  }
  for (int32_t n = 0; n < N; n++) {
    const float *xr;
    if (row) {
      for (int32_t f = 0; f < F; f++) row[f] = ml_load(x, n * F + f);
      xr = row;
    } else {
      xr = (const float *)x->data + (size_t)n * F;
    }
    float *s = z + (size_t)n * zc;
    for (int32_t c = 0; c < C; c++) s[c] = ml_dot(xr, w + (size_t)c * F, F) + (b ? b[c] : 0.f);
    if (cls) {
      if (C == 1) {
        y[n] = s[0] > 0 ? labels[1] : labels[0];
      } else {
        int32_t best = 0;
        float top = s[0];
        for (int32_t c = 1; c < C; c++)
          if (s[c] > top) {
            top = s[c];
            best = c;
          }
        y[n] = labels[best];
      }
    }
    if (C > 1) {
      ml_post(s, C, post);
    } else if (post == POST_PROBIT) {
      s[0] = ml_probit(s[0]);
    } else if (second) {
      float v = post == POST_LOGISTIC ? ml_logistic(s[0]) : s[0];
      s[0] = 1.f - v;
      s[1] = v;
    }
  }
  return EA_OK;
}

/* -- tree ensembles -------------------------------------------------------------------- */

/* A split node (agent/convert/ops/ml.py encodes them): go left iff x[f] <= thr (or == thr). */
typedef struct {
  float thr;
  int32_t feat; /* feature index | kind flags */
  int32_t left; /* >= 0: a split node; < 0: leaf ~left */
  int32_t right;
} ml_node_t;

#define ML_FEATURE_MASK 0xFFFFFF
#define ML_KIND_EQ (1 << 24)
#define ML_KIND_NAN_LEFT (1 << 25)
#define ML_TREE_BLOCK 64

/* The common case: every split is x <= t with NaN going right. Returns the leaf. */
static inline int32_t ml_walk_le(const ml_node_t *nodes, int32_t i, const float *x) {
  while (i >= 0) {
    const ml_node_t *n = nodes + i;
    i = x[n->feat] <= n->thr ? n->left : n->right;
  }
  return ~i;
}

static inline int32_t ml_walk(const ml_node_t *nodes, int32_t i, const float *x) {
  while (i >= 0) {
    const ml_node_t *n = nodes + i;
    int32_t f = n->feat;
    float v = x[f & ML_FEATURE_MASK];
    int go = (f & ML_KIND_EQ) ? (v == n->thr) : (v <= n->thr);
    if ((f & ML_KIND_NAN_LEFT) && v != v) go = 1;
    i = go ? n->left : n->right;
  }
  return ~i;
}

/* One step of a walk that may already be at a leaf (i < 0: it stays), without a branch on it. */
static inline int32_t ml_step_le(const ml_node_t *nodes, int32_t i, const float *x) {
  const ml_node_t *n = nodes + (i < 0 ? 0 : i);
  int32_t next = x[n->feat] <= n->thr ? n->left : n->right;
  return i < 0 ? i : next;
}

static inline int32_t ml_step(const ml_node_t *nodes, int32_t i, const float *x) {
  const ml_node_t *n = nodes + (i < 0 ? 0 : i);
  int32_t f = n->feat;
  float v = x[f & ML_FEATURE_MASK];
  int go = ((f & ML_KIND_EQ) ? (v == n->thr) : (v <= n->thr)) | ((f & ML_KIND_NAN_LEFT) && v != v);
  int32_t next = go ? n->left : n->right;
  return i < 0 ? i : next;
}

/* The leaves of one tree for nb rows. Four rows walk together: their loads overlap. */
static void ml_walk_rows(const ml_node_t *nodes, int32_t root, const float *xb, int32_t F, int32_t nb, int only_le,
                         int32_t *leaves) {
  int32_t r = 0;
  for (; r + 4 <= nb; r += 4) {
    const float *x0 = xb + (size_t)r * F, *x1 = x0 + F, *x2 = x1 + F, *x3 = x2 + F;
    int32_t a = root, b = root, c = root, d = root;
    if (only_le) {
      while ((a & b & c & d) >= 0) { /* not all four at a leaf */
        a = ml_step_le(nodes, a, x0);
        b = ml_step_le(nodes, b, x1);
        c = ml_step_le(nodes, c, x2);
        d = ml_step_le(nodes, d, x3);
      }
    } else {
      while ((a & b & c & d) >= 0) {
        a = ml_step(nodes, a, x0);
        b = ml_step(nodes, b, x1);
        c = ml_step(nodes, c, x2);
        d = ml_step(nodes, d, x3);
      }
    }
    leaves[r] = ~a;
    leaves[r + 1] = ~b;
    leaves[r + 2] = ~c;
    leaves[r + 3] = ~d;
  }
  for (; r < nb; r++) {
    const float *xr = xb + (size_t)r * F;
    leaves[r] = only_le ? ml_walk_le(nodes, root, xr) : ml_walk(nodes, root, xr);
  }
}

/* A leaf's weight for output c, by the aggregate function (onnxruntime's TreeAggregator*). */
static inline void ml_add_weight(int32_t agg, float *s, uint8_t *h, int32_t c, float w) {
  if (agg == AGG_SUM || agg == AGG_AVERAGE) {
    s[c] += w;
  } else if (agg == AGG_MIN) {
    s[c] = (!h[c] || w < s[c]) ? w : s[c];
  } else {
    s[c] = (!h[c] || w > s[c]) ? w : s[c];
  }
  h[c] = 1;
}

typedef struct {
  int32_t mode, C, agg, post, nbase, binary, all_positive, n_trees;
  const float *base;
  const int64_t *labels;
} ml_forest_t;

/* The two-class case of TreeEnsembleClassifier, as onnxruntime's TreeAggregatorClassifier does it. */
static int64_t ml_finish_binary(const ml_forest_t *fo, float *s, const uint8_t *h, float *z) {
  float s0 = s[0], s1 = s[1];
  int h0 = h[0], h1 = h[1];
  int size = 2, extra = -1;
  if (fo->nbase == 2) {
    if (h1) {
      s1 = fo->base[1] + s0; /* sic: onnxruntime adds base_values[1] to class 0's score */
      s0 = -s1;
    } else {
      s1 += fo->base[1];
      s0 += fo->base[0];
    }
  } else if (fo->nbase == 1) {
    s0 += fo->base[0];
    if (!h1) size = 1;
  } else if (fo->nbase == 0) {
    extra = 3;
    if (!h1) size = 1;
  }
  float pos = (size == 2 && h1) ? s1 : (h0 ? s0 : 0.f);
  int64_t label;
  if (fo->binary) {
    if (fo->all_positive) {
      extra = pos > 0.5f ? 0 : 1;
      label = pos > 0.5f ? fo->labels[1] : fo->labels[0];
    } else {
      extra = pos > 0 ? 2 : 3;
      label = pos > 0 ? fo->labels[1] : fo->labels[0];
    }
  } else {
    label = pos > 0 ? 1 : 0; /* onnxruntime's positive/negative labels here are 1 and 0 */
  }
  /* onnxruntime writes a score that never received a weight (nor a base value) as 0. */
  if (!h0) s0 = 0.f;
  if (size == 2) {
    z[0] = s0;
    z[1] = h1 ? s1 : 0.f;
    ml_post(z, 2, fo->post);
  } else if (fo->post == POST_PROBIT) {
    z[0] = ml_probit(s0);
    z[1] = 0.f; /* onnxruntime leaves it unset */
  } else if (extra == 0 || extra == 1) {
    z[0] = 1 - s0;
    z[1] = s0;
  } else if (extra == 2 || extra == 3) {
    if (fo->post == POST_LOGISTIC) {
      z[0] = ml_logistic(-s0);
      z[1] = ml_logistic(s0);
    } else {
      z[0] = -s0;
      z[1] = s0;
    }
  } else {
    z[0] = s0;
    z[1] = 0.f; /* onnxruntime leaves it unset */
  }
  return label;
}

/* Scores of one row -> outputs (z: the row's scores; *y: its label for a classifier). */
static void ml_finish_row(const ml_forest_t *fo, float *s, uint8_t *h, float *z, int64_t *y) {
  int32_t C = fo->C;
  if (fo->mode == TREE_REGRESSOR_1) {
    float origin = fo->base[0], v;
    if (fo->agg == AGG_SUM) {
      v = s[0] + origin;
    } else if (fo->agg == AGG_AVERAGE) {
      v = s[0] / (float)fo->n_trees + origin;
    } else {
      v = h[0] ? s[0] + origin : origin;
    }
    z[0] = fo->post == POST_PROBIT ? ml_probit(v) : v;
    return;
  }
  if (fo->mode == TREE_REGRESSOR_N) {
    int use_base = fo->nbase == C;
    for (int32_t c = 0; c < C; c++) {
      float v;
      if (fo->agg == AGG_SUM) {
        v = use_base ? s[c] + fo->base[c] : s[c];
      } else if (fo->agg == AGG_AVERAGE) {
        v = use_base ? s[c] / (float)fo->n_trees + fo->base[c] : s[c] / (float)fo->n_trees;
      } else {
        v = use_base ? fo->base[c] : 0.f;
        v += h[c] ? s[c] : 0.f;
      }
      z[c] = h[c] ? v : 0.f; /* a target no leaf gave a weight to is written as 0, base value or not */
    }
    ml_post(z, C, fo->post);
    return;
  }
  /* classifier */
  if (C == 2) {
    *y = ml_finish_binary(fo, s, h, z);
    return;
  }
  for (int32_t c = 0; c < fo->nbase && c < C; c++) {
    if (!h[c]) {
      h[c] = 1;
      s[c] = fo->base[c];
    } else {
      s[c] += fo->base[c];
    }
  }
  int32_t best = -1;
  float top = 0.f;
  for (int32_t c = 0; c < C; c++)
    if (h[c] && (best == -1 || s[c] > top)) {
      best = c;
      top = s[c];
    }
  *y = fo->labels[best < 0 ? 0 : best];
  for (int32_t c = 0; c < C; c++) z[c] = s[c];
  ml_post(z, C, fo->post);
}

/*
 * in: x [N,F] or [F], nodes [n,4] (ml_node_t), roots int32 [trees], leaf_start int32 [leaves+1],
 *     leaf_ids int32, leaf_values f32, base_values f32, labels int64 (classifier).
 * out: regressor: scores [N,C]; classifier: labels int64 [N], scores [N,C].
 * iattr: mode, C, aggregate, post, F, only "<=" splits, n base values, binary case, weights all >= 0, trees,
 *        dense leaves (C weights per leaf, for outputs 0..C-1 in order; leaf_start/leaf_ids unused).
 */
static int32_t op_trees(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  const ml_node_t *nodes = (const ml_node_t *)op->in[1]->data;
  const int32_t *roots = op->in[2]->data;
  const int32_t *leaf_start = op->in[3]->data;
  const int32_t *leaf_ids = op->in[4]->data;
  const float *leaf_vals = op->in[5]->data;
  const int32_t *ia = op->iattr;
  ml_forest_t fo;
  fo.mode = ia[0];
  fo.C = ia[1];
  fo.agg = ia[2];
  fo.post = ia[3];
  int32_t F = ia[4], only_le = ia[5];
  fo.nbase = ia[6];
  fo.binary = ia[7];
  fo.all_positive = ia[8];
  fo.n_trees = ia[9];
  int32_t dense = ia[10]; /* leaf i's weights are leaf_values[i*C .. i*C+C) */
  fo.base = op->in[6]->data;
  fo.labels = fo.mode == TREE_CLASSIFIER ? (const int64_t *)op->in[7]->data : 0;
  int32_t C = fo.C, T = op->in[2]->count;
  int32_t N = x->rank <= 1 ? 1 : x->dims[0];
  if (x->count != N * F || !ml_numeric(x->dtype) || C < 1 || T != fo.n_trees) return EA_ERR_INTERNAL;
  float *z = fo.mode == TREE_CLASSIFIER ? (float *)op->out[1]->data : (float *)op->out[0]->data;
  int64_t *y = fo.mode == TREE_CLASSIFIER ? (int64_t *)op->out[0]->data : 0;

  float *scores = ea_scratch((uint32_t)ML_TREE_BLOCK * (uint32_t)C * 4u);
  uint8_t *has = ea_scratch((uint32_t)ML_TREE_BLOCK * (uint32_t)C);
  int32_t leaves[ML_TREE_BLOCK];
  float *xf = 0;
  if (x->dtype != EA_F32) xf = ea_scratch((uint32_t)ML_TREE_BLOCK * (uint32_t)F * 4u);
  if (!scores || !has || (x->dtype != EA_F32 && !xf)) return EA_ERR_NOMEM;

  for (int32_t r0 = 0; r0 < N; r0 += ML_TREE_BLOCK) {
    int32_t nb = EA_MIN(ML_TREE_BLOCK, N - r0);
    const float *xb;
    if (xf) {
      for (int32_t i = 0; i < nb * F; i++) xf[i] = ml_load(x, r0 * F + i);
      xb = xf;
    } else {
      xb = (const float *)x->data + (size_t)r0 * F;
    }
    for (int32_t i = 0; i < nb * C; i++) {
      scores[i] = 0.f;
      has[i] = 0;
    }
    for (int32_t t = 0; t < T; t++) {
      ml_walk_rows(nodes, roots[t], xb, F, nb, only_le, leaves);
      for (int32_t r = 0; r < nb; r++) {
        int32_t leaf = leaves[r];
        float *s = scores + (size_t)r * C;
        uint8_t *h = has + (size_t)r * C;
        if (dense) {
          const float *wv = leaf_vals + (size_t)leaf * C;
          for (int32_t c = 0; c < C; c++) ml_add_weight(fo.agg, s, h, c, wv[c]);
        } else {
          for (int32_t k = leaf_start[leaf], end = leaf_start[leaf + 1]; k < end; k++)
            ml_add_weight(fo.agg, s, h, leaf_ids[k], leaf_vals[k]);
        }
      }
    }
    for (int32_t r = 0; r < nb; r++) {
      int32_t row = r0 + r;
      ml_finish_row(&fo, scores + (size_t)r * C, has + (size_t)r * C, z + (size_t)row * C, y ? y + row : 0);
    }
  }
  return EA_OK;
}

ea_kernel_fn ea_ops_ml(uint32_t opcode) {
  switch (opcode & 63u) {
  case OP_SCALER: return op_scaler;
  case OP_NORMALIZER: return op_normalizer;
  case OP_LINEAR: return op_linear;
  case OP_TREES: return op_trees;
  case OP_ARRAY_FEATURE_EXTRACTOR: return op_array_feature_extractor;
  case OP_BINARIZER: return op_binarizer;
  default: return 0;
  }
}
