/*
 * ops_norm.c: the "norm" op family (plan.h): normalisations and LRN.
 * Opcodes: agent/convert/ops/norm.py. float32 only.
 *
 * Statistics are two-pass (mean, then the mean squared deviation), summed in
 * float32 SIMD lanes over blocks of 1024 elements and in double across blocks.
 */
#include <wasm_simd128.h>

#include "ea_math.h"

enum {
  OP_BATCHNORM = 0, /* x, scale, bias, mean, var -> y. iattr: per_element (BN-7 spatial=0); fattr: epsilon */
  OP_INSTANCENORM = 1, /* x, scale, bias -> y. fattr: epsilon */
  OP_LAYERNORM = 2,    /* x, scale, bias? -> y, mean?, inv_std_dev?. iattr: axis; fattr: epsilon */
  OP_LRN = 3,          /* x -> y. iattr: size; fattr: alpha, beta, bias */
  OP_LPNORM = 4,       /* x -> y. iattr: axis, p (1 or 2) */
  OP_MVN = 5,          /* x -> y. iattr: bit mask of the reduced axes; fattr: epsilon (added to the std dev) */
};

#define BLOCK 1024

static double sum_f32(const float *x, int32_t n) {
  double total = 0;
  int32_t i = 0;
  while (i < n) {
    int32_t end = EA_MIN(n, i + BLOCK);
    v128_t v = wasm_f32x4_splat(0.0f);
    float t = 0;
    for (; i + 4 <= end; i += 4) v = wasm_f32x4_add(v, wasm_v128_load(x + i));
    for (; i < end; i++) t += x[i];
    total += (double)wasm_f32x4_extract_lane(v, 0) + (double)wasm_f32x4_extract_lane(v, 1) +
             (double)wasm_f32x4_extract_lane(v, 2) + (double)wasm_f32x4_extract_lane(v, 3) + (double)t;
  }
  return total;
}

/* Sum of (x - m)^2. */
static double sumsq_dev(const float *x, int32_t n, float m) {
  double total = 0;
  int32_t i = 0;
  v128_t mv = wasm_f32x4_splat(m);
  while (i < n) {
    int32_t end = EA_MIN(n, i + BLOCK);
    v128_t v = wasm_f32x4_splat(0.0f);
    float t = 0;
    for (; i + 4 <= end; i += 4) {
      v128_t d = wasm_f32x4_sub(wasm_v128_load(x + i), mv);
      v = wasm_f32x4_add(v, wasm_f32x4_mul(d, d));
    }
    for (; i < end; i++) t += (x[i] - m) * (x[i] - m);
    total += (double)wasm_f32x4_extract_lane(v, 0) + (double)wasm_f32x4_extract_lane(v, 1) +
             (double)wasm_f32x4_extract_lane(v, 2) + (double)wasm_f32x4_extract_lane(v, 3) + (double)t;
  }
  return total;
}

/* Mean and population variance of x[0..n). */
static void stats(const float *x, int32_t n, float *mean, float *var) {
  if (n <= 0) {
    *mean = 0;
    *var = 0;
    return;
  }
  float m = (float)(sum_f32(x, n) / n);
  *mean = m;
  *var = (float)(sumsq_dev(x, n, m) / n);
}

/* y = x * a + b. */
static void affine(const float *x, float *y, int32_t n, float a, float b) {
  v128_t av = wasm_f32x4_splat(a), bv = wasm_f32x4_splat(b);
  int32_t i = 0;
  for (; i + 4 <= n; i += 4) wasm_v128_store(y + i, wasm_f32x4_add(wasm_f32x4_mul(wasm_v128_load(x + i), av), bv));
  for (; i < n; i++) y[i] = x[i] * a + b;
}

static int32_t op_batchnorm(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0], *sc = op->in[1], *bi = op->in[2], *mu = op->in[3], *va = op->in[4];
  ea_tensor_t *y = op->out[0];
  if (op->n_in < 5 || !sc || !bi || !mu || !va || x->rank < 2 || x->count != y->count) return EA_ERR_INTERNAL;
  float eps = op->n_f > 0 ? op->fattr[0] : 1e-5f;
  int32_t per_element = op->n_i > 0 && op->iattr[0];
  int32_t batch = x->dims[0];
  int32_t channels = x->dims[1];
  int32_t inner = batch * channels ? x->count / (batch * channels) : 0;
  if (per_element) {
    channels *= inner;
    inner = 1;
  }
  if (sc->count != channels || bi->count != channels || mu->count != channels || va->count != channels) return EA_ERR_INTERNAL;
  const float *s = sc->data, *b = bi->data, *m = mu->data, *v = va->data, *xs = x->data;
  float *ys = y->data;
  float *ab = ea_scratch((uint32_t)channels * 8u);
  if (!ab && channels) return EA_ERR_NOMEM;
  for (int32_t c = 0; c < channels; c++) {
    float a = s[c] / sqrtf(v[c] + eps);
    ab[2 * c] = a;
    ab[2 * c + 1] = b[c] - m[c] * a;
  }
  if (inner == 1) {
    for (int32_t n = 0; n < batch; n++) {
      const float *xr = xs + (size_t)n * channels;
      float *yr = ys + (size_t)n * channels;
      for (int32_t c = 0; c < channels; c++) yr[c] = xr[c] * ab[2 * c] + ab[2 * c + 1];
    }
    return EA_OK;
  }
  for (int32_t n = 0; n < batch; n++)
    for (int32_t c = 0; c < channels; c++) {
      size_t at = ((size_t)n * channels + c) * inner;
      affine(xs + at, ys + at, inner, ab[2 * c], ab[2 * c + 1]);
    }
  return EA_OK;
}

static int32_t op_instancenorm(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0], *sc = op->in[1], *bi = op->in[2];
  ea_tensor_t *y = op->out[0];
  if (op->n_in < 3 || !sc || !bi || x->rank < 2 || x->count != y->count) return EA_ERR_INTERNAL;
  float eps = op->n_f > 0 ? op->fattr[0] : 1e-5f;
  int32_t batch = x->dims[0], channels = x->dims[1];
  int32_t inner = batch * channels ? x->count / (batch * channels) : 0;
  if (sc->count != channels || bi->count != channels) return EA_ERR_INTERNAL;
  const float *s = sc->data, *b = bi->data, *xs = x->data;
  float *ys = y->data;
  for (int32_t n = 0; n < batch; n++)
    for (int32_t c = 0; c < channels; c++) {
      size_t at = ((size_t)n * channels + c) * inner;
      float mean, var;
      stats(xs + at, inner, &mean, &var);
      float a = s[c] / sqrtf(var + eps);
      affine(xs + at, ys + at, inner, a, b[c] - mean * a);
    }
  return EA_OK;
}

static int32_t op_layernorm(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0], *sc = op->in[1], *bi = op->n_in > 2 ? op->in[2] : 0;
  ea_tensor_t *y = op->out[0];
  ea_tensor_t *mo = op->n_out > 1 ? op->out[1] : 0, *io = op->n_out > 2 ? op->out[2] : 0;
  if (op->n_i < 1 || !sc || x->count != y->count) return EA_ERR_INTERNAL;
  int32_t axis = op->iattr[0];
  float eps = op->n_f > 0 ? op->fattr[0] : 1e-5f;
  if (axis < 0 || axis > x->rank) return EA_ERR_INTERNAL;
  int32_t outer = 1;
  for (int32_t i = 0; i < axis; i++) outer *= x->dims[i];
  int32_t inner = outer ? x->count / outer : 0;
  if (sc->count != inner || (bi && bi->count != inner)) return EA_ERR_INTERNAL;
  if ((mo && mo->count != outer) || (io && io->count != outer)) return EA_ERR_INTERNAL;
  const float *s = sc->data, *b = bi ? bi->data : 0, *xs = x->data;
  float *ys = y->data;
  for (int32_t r = 0; r < outer; r++) {
    const float *xr = xs + (size_t)r * inner;
    float *yr = ys + (size_t)r * inner;
    float mean, var;
    stats(xr, inner, &mean, &var);
    float inv = 1.0f / sqrtf(var + eps);
    if (mo) ((float *)mo->data)[r] = mean;
    if (io) ((float *)io->data)[r] = inv;
    v128_t mv = wasm_f32x4_splat(mean), iv = wasm_f32x4_splat(inv);
    int32_t i = 0;
    if (b) {
      for (; i + 4 <= inner; i += 4) {
        v128_t nrm = wasm_f32x4_mul(wasm_f32x4_sub(wasm_v128_load(xr + i), mv), iv);
        wasm_v128_store(yr + i, wasm_f32x4_add(wasm_f32x4_mul(nrm, wasm_v128_load(s + i)), wasm_v128_load(b + i)));
      }
      for (; i < inner; i++) yr[i] = (xr[i] - mean) * inv * s[i] + b[i];
    } else {
      for (; i + 4 <= inner; i += 4) {
        v128_t nrm = wasm_f32x4_mul(wasm_f32x4_sub(wasm_v128_load(xr + i), mv), iv);
        wasm_v128_store(yr + i, wasm_f32x4_mul(nrm, wasm_v128_load(s + i)));
      }
      for (; i < inner; i++) yr[i] = (xr[i] - mean) * inv * s[i];
    }
  }
  return EA_OK;
}

static int32_t op_lrn(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  if (op->n_i < 1 || op->n_f < 3 || x->rank < 2 || x->count != y->count) return EA_ERR_INTERNAL;
  int32_t size = op->iattr[0];
  float alpha = op->fattr[0], beta = op->fattr[1], bias = op->fattr[2];
  int32_t batch = x->dims[0], channels = x->dims[1];
  int32_t inner = batch * channels ? x->count / (batch * channels) : 0;
  if (size < 1) return EA_ERR_INTERNAL;
  int32_t before = (size - 1) / 2, after = size - 1 - before;
  float *acc = ea_scratch((uint32_t)inner * 4u);
  if (!acc && inner) return EA_ERR_NOMEM;
  const float *xs = x->data;
  float *ys = y->data;
  float k = alpha / (float)size;
  v128_t kv = wasm_f32x4_splat(k), bv = wasm_f32x4_splat(bias);
  for (int32_t n = 0; n < batch; n++) {
    const float *xn = xs + (size_t)n * channels * inner;
    float *yn = ys + (size_t)n * channels * inner;
    for (int32_t c = 0; c < channels; c++) {
      int32_t lo = EA_MAX(0, c - before), hi = EA_MIN(channels - 1, c + after);
      int32_t i;
      for (i = 0; i < inner; i++) acc[i] = 0;
      for (int32_t j = lo; j <= hi; j++) {
        const float *xc = xn + (size_t)j * inner;
        for (i = 0; i + 4 <= inner; i += 4) {
          v128_t v = wasm_v128_load(xc + i);
          wasm_v128_store(acc + i, wasm_f32x4_add(wasm_v128_load(acc + i), wasm_f32x4_mul(v, v)));
        }
        for (; i < inner; i++) acc[i] += xc[i] * xc[i];
      }
      const float *xc = xn + (size_t)c * inner;
      float *yc = yn + (size_t)c * inner;
      i = 0;
      if (beta == 0.75f) {
        /* t^-0.75 = 1 / (sqrt(t) * sqrt(sqrt(t))) */
        for (; i + 4 <= inner; i += 4) {
          v128_t t = wasm_f32x4_add(bv, wasm_f32x4_mul(kv, wasm_v128_load(acc + i)));
          v128_t r = wasm_f32x4_sqrt(t);
          v128_t d = wasm_f32x4_mul(r, wasm_f32x4_sqrt(r));
          wasm_v128_store(yc + i, wasm_f32x4_div(wasm_v128_load(xc + i), d));
        }
      } else if (beta == 0.5f) {
        for (; i + 4 <= inner; i += 4) {
          v128_t t = wasm_f32x4_add(bv, wasm_f32x4_mul(kv, wasm_v128_load(acc + i)));
          wasm_v128_store(yc + i, wasm_f32x4_div(wasm_v128_load(xc + i), wasm_f32x4_sqrt(t)));
        }
      }
      for (; i < inner; i++) yc[i] = xc[i] * powf(bias + k * acc[i], -beta);
    }
  }
  return EA_OK;
}

static int32_t op_lpnorm(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  if (op->n_i < 2 || x->count != y->count) return EA_ERR_INTERNAL;
  int32_t axis = op->iattr[0], p = op->iattr[1];
  if (axis < 0 || axis >= x->rank || (p != 1 && p != 2)) return EA_ERR_INTERNAL;
  int32_t outer = 1, inner = 1, len = x->dims[axis];
  for (int32_t i = 0; i < axis; i++) outer *= x->dims[i];
  for (int32_t i = axis + 1; i < x->rank; i++) inner *= x->dims[i];
  float *acc = ea_scratch((uint32_t)inner * 4u);
  if (!acc && inner) return EA_ERR_NOMEM;
  const float *xs = x->data;
  float *ys = y->data;
  for (int32_t o = 0; o < outer; o++) {
    const float *xo = xs + (size_t)o * len * inner;
    float *yo = ys + (size_t)o * len * inner;
    for (int32_t i = 0; i < inner; i++) acc[i] = 0;
    for (int32_t a = 0; a < len; a++) {
      const float *xa = xo + (size_t)a * inner;
      if (p == 2)
        for (int32_t i = 0; i < inner; i++) acc[i] += xa[i] * xa[i];
      else
        for (int32_t i = 0; i < inner; i++) acc[i] += fabsf(xa[i]);
    }
    for (int32_t i = 0; i < inner; i++) {
      float nrm = p == 2 ? sqrtf(acc[i]) : acc[i];
      acc[i] = nrm == 0.0f ? 0.0f : 1.0f / nrm;
    }
    for (int32_t a = 0; a < len; a++) {
      const float *xa = xo + (size_t)a * inner;
      float *ya = yo + (size_t)a * inner;
      for (int32_t i = 0; i < inner; i++) ya[i] = acc[i] == 0.0f ? 0.0f : xa[i] * acc[i];
    }
  }
  return EA_OK;
}

static int32_t op_mvn(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  if (op->n_i < 1 || x->count != y->count) return EA_ERR_INTERNAL;
  uint32_t mask = (uint32_t)op->iattr[0];
  float eps = op->n_f > 0 ? op->fattr[0] : 1e-9f;
  int32_t strides[EA_MAX_RANK];
  ea_strides(x, strides);
  int32_t kd[EA_MAX_RANK], ks[EA_MAX_RANK], rd[EA_MAX_RANK], rs[EA_MAX_RANK];
  int32_t nk = 0, nr = 0, reduced = 1, kept = 1;
  for (int32_t i = 0; i < x->rank; i++) {
    if (mask >> i & 1u) {
      rd[nr] = x->dims[i];
      rs[nr++] = strides[i];
      reduced *= x->dims[i];
    } else {
      kd[nk] = x->dims[i];
      ks[nk++] = strides[i];
      kept *= x->dims[i];
    }
  }
  if (x->count == 0) return EA_OK;
  /* Offsets of the reduced elements relative to a kept position, and a gathered copy. */
  int32_t *off = ea_scratch((uint32_t)reduced * 8u);
  if (!off) return EA_ERR_NOMEM;
  float *buf = (float *)(off + reduced);
  int32_t idx[EA_MAX_RANK] = {0};
  for (int32_t r = 0; r < reduced; r++) {
    int32_t o = 0;
    for (int32_t i = 0; i < nr; i++) o += idx[i] * rs[i];
    off[r] = o;
    for (int32_t i = nr - 1; i >= 0; i--) {
      if (++idx[i] < rd[i]) break;
      idx[i] = 0;
    }
  }
  const float *xs = x->data;
  float *ys = y->data;
  int32_t kidx[EA_MAX_RANK] = {0};
  for (int32_t q = 0; q < kept; q++) {
    int32_t base = 0;
    for (int32_t i = 0; i < nk; i++) base += kidx[i] * ks[i];
    for (int32_t r = 0; r < reduced; r++) buf[r] = xs[base + off[r]];
    float mean, var;
    stats(buf, reduced, &mean, &var);
    float inv = 1.0f / (sqrtf(var) + eps);
    for (int32_t r = 0; r < reduced; r++) ys[base + off[r]] = (buf[r] - mean) * inv;
    for (int32_t i = nk - 1; i >= 0; i--) {
      if (++kidx[i] < kd[i]) break;
      kidx[i] = 0;
    }
  }
  return EA_OK;
}

ea_kernel_fn ea_ops_norm(uint32_t opcode) {
  switch (opcode & 63u) {
  case OP_BATCHNORM: return op_batchnorm;
  case OP_INSTANCENORM: return op_instancenorm;
  case OP_LAYERNORM: return op_layernorm;
  case OP_LRN: return op_lrn;
  case OP_LPNORM: return op_lpnorm;
  case OP_MVN: return op_mvn;
  default: return 0;
  }
}
