/*
 * ops_pool.c: pooling and ConvTranspose, opcodes 32..63 of the "conv" family
 * (ops_conv.c's lookup falls through to ea_ops_pool). Opcodes: agent/convert/ops/pool.py.
 *
 * Layout NC(D)(H)W. Every kernel sees 1 to 3 spatial dimensions as (D, H, W),
 * the missing leading ones being 1; the lowering pads the per-axis attributes
 * the same way (kernel 1, stride 1, dilation 1, pads 0).
 */
#include <float.h>
#include <wasm_simd128.h>

#include "ea_gemm.h"
#include "ea_math.h"

enum {
  OP_POOL = 32,           /* x -> y. iattr: kind, count_include_pad, k[3], s[3], d[3], pad_begin[3], pad_end[3]; fattr: p */
  OP_GLOBAL_POOL = 33,    /* x -> y (N, C, 1...). iattr: kind; fattr: p */
  OP_CONV_TRANSPOSE = 34, /* x, w, bias? -> y. iattr: group, k[3], s[3], d[3], pad_begin[3], co_blk, raw.
                             w: per group, per block of co_blk output channels, the block's rows of
                             (Cout_g*K, Cin_g) in ea_gemm A panels; with raw = 1 ONNX's (Cin, Cout_g, k...),
                             packed block by block at each run */
};

enum { KIND_MAX = 0, KIND_AVG = 1, KIND_LP = 2 };

/* Spatial dims of an N, C, spatial... tensor as (D, H, W). */
static int32_t spatial3(const ea_tensor_t *t, int32_t *sp) {
  int32_t nsp = t->rank - 2;
  if (nsp < 1 || nsp > 3) return 0;
  for (int32_t i = 0; i < 3; i++) sp[i] = i < 3 - nsp ? 1 : t->dims[2 + i - (3 - nsp)];
  return 1;
}

/* Taps of a window: k in [lo, hi) land inside [0, in); cnt counts taps inside [-pb, in + pe). */
typedef struct {
  int32_t lo, hi, cnt;
} taps_t;

static void window_taps(int32_t o, int32_t in, int32_t k, int32_t s, int32_t d, int32_t pb, int32_t pe, taps_t *t) {
  int32_t start = o * s - pb;
  t->lo = k;
  t->hi = 0;
  t->cnt = 0;
  for (int32_t j = 0; j < k; j++) {
    int32_t i = start + j * d;
    if (i >= 0 && i < in) {
      if (j < t->lo) t->lo = j;
      t->hi = j + 1;
    }
    if (i >= -pb && i < in + pe) t->cnt++;
  }
  if (t->hi <= t->lo) t->lo = t->hi = 0;
}

/* Output positions o in [lo, hi) for which o * s + off lies in [0, in). */
static void out_range(int32_t off, int32_t s, int32_t in, int32_t n_out, int32_t *lo, int32_t *hi) {
  int32_t a = 0;
  while (a < n_out && a * s + off < 0) a++;
  int32_t b = a;
  while (b < n_out && b * s + off < in) b++;
  *lo = a;
  *hi = b;
}

/* acc[o] op= src[o * s] for o in [0, n): the inner loop of a pooling row. */
static void row_max(float *acc, const float *src, int32_t n, int32_t s) {
  int32_t o = 0;
  if (s == 1) {
    for (; o + 4 <= n; o += 4) wasm_v128_store(acc + o, wasm_f32x4_pmax(wasm_v128_load(acc + o), wasm_v128_load(src + o)));
  } else if (s == 2) {
    /* Reads src[0 .. 2n-1): keep the last vector's odd lane inside the row. */
    for (; o + 4 < n; o += 4) {
      v128_t a = wasm_v128_load(src + 2 * o), b = wasm_v128_load(src + 2 * o + 4);
      v128_t even = wasm_i32x4_shuffle(a, b, 0, 2, 4, 6);
      wasm_v128_store(acc + o, wasm_f32x4_pmax(wasm_v128_load(acc + o), even));
    }
  }
  for (; o < n; o++) {
    float v = src[o * s];
    if (v > acc[o]) acc[o] = v;
  }
}

static void row_sum(float *acc, const float *src, int32_t n, int32_t s) {
  int32_t o = 0;
  if (s == 1) {
    for (; o + 4 <= n; o += 4) wasm_v128_store(acc + o, wasm_f32x4_add(wasm_v128_load(acc + o), wasm_v128_load(src + o)));
  } else if (s == 2) {
    for (; o + 4 < n; o += 4) {
      v128_t a = wasm_v128_load(src + 2 * o), b = wasm_v128_load(src + 2 * o + 4);
      v128_t even = wasm_i32x4_shuffle(a, b, 0, 2, 4, 6);
      wasm_v128_store(acc + o, wasm_f32x4_add(wasm_v128_load(acc + o), even));
    }
  }
  for (; o < n; o++) acc[o] += src[o * s];
}

static void row_lp(float *acc, const float *src, int32_t n, int32_t s, float p) {
  if (p == 2.0f) {
    for (int32_t o = 0; o < n; o++) {
      float v = src[o * s];
      acc[o] += v * v;
    }
  } else if (p == 1.0f) {
    for (int32_t o = 0; o < n; o++) acc[o] += fabsf(src[o * s]);
  } else {
    for (int32_t o = 0; o < n; o++) acc[o] += powf(fabsf(src[o * s]), p);
  }
}

/* ---- MaxPool fast path: float32, 2-D (or 1-D), no dilation, kernel width 2 or 3, stride width 1 or 2 ----
 * (2x2 stride 2 and 3x3 stride 2 pad 1 in CNNs.) Per output row, the rows of the window are
 * max-reduced into a row buffer t (columns shifted by the begin pad, -FLT_MAX where the window
 * reaches into the padding), then each output is the max of kw neighbours of t: even/odd lanes
 * of two vectors for stride 2. The accumulator starts at -FLT_MAX and takes pmax (a < b ? b : a)
 * as the generic path does, so both give the same results (NaN inputs ignored). */
#define FAST_ROW_MAX 2048 /* floats of t, on the stack */

/* t[i] = max(-FLT_MAX, rows[0][i], ..., rows[m-1][i]) for i < n. */
static void fast_vmax(float *t, const float *const *rows, int32_t m, int32_t n) {
  const v128_t lowest = wasm_f32x4_splat(-FLT_MAX);
  int32_t i = 0;
  if (m == 2) {
    const float *r0 = rows[0], *r1 = rows[1];
    for (; i + 4 <= n; i += 4)
      wasm_v128_store(t + i, wasm_f32x4_pmax(wasm_f32x4_pmax(lowest, wasm_v128_load(r0 + i)), wasm_v128_load(r1 + i)));
  } else if (m == 3) {
    const float *r0 = rows[0], *r1 = rows[1], *r2 = rows[2];
    for (; i + 4 <= n; i += 4) {
      v128_t v = wasm_f32x4_pmax(wasm_f32x4_pmax(lowest, wasm_v128_load(r0 + i)), wasm_v128_load(r1 + i));
      wasm_v128_store(t + i, wasm_f32x4_pmax(v, wasm_v128_load(r2 + i)));
    }
  } else {
    for (; i + 4 <= n; i += 4) {
      v128_t v = lowest;
      for (int32_t r = 0; r < m; r++) v = wasm_f32x4_pmax(v, wasm_v128_load(rows[r] + i));
      wasm_v128_store(t + i, v);
    }
  }
  for (; i < n; i++) {
    float v = -FLT_MAX;
    for (int32_t r = 0; r < m; r++) v = rows[r][i] > v ? rows[r][i] : v;
    t[i] = v;
  }
}

/* y[o] = max(t[o * s + j], j < k) for o < n; t holds s * (n - 1) + k + 8 floats. */
static void fast_hmax(float *y, const float *t, int32_t n, int32_t k, int32_t s) {
  int32_t o = 0;
  if (s == 2) {
    v128_t a = wasm_v128_load(t);
    for (; o + 4 <= n; o += 4) {
      v128_t b = wasm_v128_load(t + 2 * o + 4), c = wasm_v128_load(t + 2 * o + 8);
      v128_t even = wasm_i32x4_shuffle(a, b, 0, 2, 4, 6), odd = wasm_i32x4_shuffle(a, b, 1, 3, 5, 7);
      v128_t m = wasm_f32x4_pmax(even, odd);
      if (k == 3) m = wasm_f32x4_pmax(m, wasm_i32x4_shuffle(even, c, 1, 2, 3, 4));
      wasm_v128_store(y + o, m);
      a = c;
    }
  } else {
    for (; o + 4 <= n; o += 4) {
      v128_t m = wasm_f32x4_pmax(wasm_v128_load(t + o), wasm_v128_load(t + o + 1));
      if (k == 3) m = wasm_f32x4_pmax(m, wasm_v128_load(t + o + 2));
      wasm_v128_store(y + o, m);
    }
  }
  for (; o < n; o++) {
    const float *w = t + o * s;
    float m = w[1] > w[0] ? w[1] : w[0];
    if (k == 3) m = w[2] > m ? w[2] : m;
    y[o] = m;
  }
}

/* 2x2 stride 2 windows wholly inside the input: straight from the two input rows. */
static void fast_2x2(float *y, const float *r0, const float *r1, int32_t n) {
  const v128_t lowest = wasm_f32x4_splat(-FLT_MAX);
  int32_t o = 0;
  for (; o + 4 <= n; o += 4) {
    v128_t a = wasm_f32x4_pmax(wasm_f32x4_pmax(lowest, wasm_v128_load(r0 + 2 * o)), wasm_v128_load(r1 + 2 * o));
    v128_t b = wasm_f32x4_pmax(wasm_f32x4_pmax(lowest, wasm_v128_load(r0 + 2 * o + 4)), wasm_v128_load(r1 + 2 * o + 4));
    wasm_v128_store(y + o, wasm_f32x4_pmax(wasm_i32x4_shuffle(a, b, 0, 2, 4, 6), wasm_i32x4_shuffle(a, b, 1, 3, 5, 7)));
  }
  for (; o < n; o++) {
    float m = -FLT_MAX;
    m = r0[2 * o] > m ? r0[2 * o] : m;
    m = r0[2 * o + 1] > m ? r0[2 * o + 1] : m;
    m = r1[2 * o] > m ? r1[2 * o] : m;
    y[o] = r1[2 * o + 1] > m ? r1[2 * o + 1] : m;
  }
}

/* Returns 0 when the case is not the fast path's (the generic path runs). */
static int32_t maxpool_fast(const ea_tensor_t *x, ea_tensor_t *y, const int32_t *in, const int32_t *out,
                            const int32_t *k, const int32_t *s, const int32_t *d, const int32_t *pb) {
  if (in[0] != 1 || out[0] != 1 || k[0] != 1 || pb[0] != 0 || d[1] != 1 || d[2] != 1) return 0;
  if ((k[2] != 2 && k[2] != 3) || (s[2] != 1 && s[2] != 2) || k[1] > 16) return 0;
  int32_t tlen = s[2] * (out[2] - 1) + k[2] + 8;
  if (tlen > FAST_ROW_MAX) return 0;
  float t[FAST_ROW_MAX];
  /* Columns c in [c0, c1) of the input land in t at c + pb[2]; the rest of t stays -FLT_MAX. */
  int32_t c0 = EA_MAX(0, -pb[2]), c1 = EA_MIN(in[2], tlen - 8 - pb[2]);
  for (int32_t i = 0; i < tlen; i++) t[i] = -FLT_MAX;
  int32_t planes = x->dims[0] * x->dims[1], in_plane = in[1] * in[2], out_plane = out[1] * out[2];
  if (k[1] == 2 && k[2] == 2 && s[1] == 2 && s[2] == 2 && pb[1] == 0 && pb[2] == 0 && 2 * out[1] <= in[1] &&
      2 * out[2] <= in[2]) {
    /* With an even height the planes' row pairs follow one another: one loop over all of them. */
    int32_t n_planes = in[1] == 2 * out[1] ? 1 : planes, n_rows = in[1] == 2 * out[1] ? planes * out[1] : out[1];
    for (int32_t pl = 0; pl < n_planes; pl++) {
      const float *xp = (const float *)x->data + (size_t)pl * in_plane;
      float *yp = (float *)y->data + (size_t)pl * out_plane;
      for (int32_t oh = 0; oh < n_rows; oh++)
        fast_2x2(yp + (size_t)oh * out[2], xp + (size_t)(2 * oh) * in[2], xp + (size_t)(2 * oh + 1) * in[2], out[2]);
    }
    return 1;
  }
  const float *rows[16];
  for (int32_t pl = 0; pl < planes; pl++) {
    const float *xp = (const float *)x->data + (size_t)pl * in_plane;
    float *yp = (float *)y->data + (size_t)pl * out_plane;
    for (int32_t oh = 0; oh < out[1]; oh++) {
      int32_t m = 0;
      for (int32_t jh = 0; jh < k[1]; jh++) {
        int32_t ih = oh * s[1] - pb[1] + jh;
        if (ih >= 0 && ih < in[1]) rows[m++] = xp + (size_t)ih * in[2] + c0;
      }
      if (c1 > c0) fast_vmax(t + c0 + pb[2], rows, m, c1 - c0);
      fast_hmax(yp + (size_t)oh * out[2], t, out[2], k[2], s[2]);
    }
  }
  return 1;
}

static int32_t op_pool(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  if (op->n_i < 17 || x->rank != y->rank || x->dims[0] != y->dims[0] || x->dims[1] != y->dims[1] || x->dtype != y->dtype)
    return EA_ERR_INTERNAL;
  const int32_t *a = op->iattr;
  int32_t kind = a[0], include_pad = a[1];
  const int32_t *k = a + 2, *s = a + 5, *d = a + 8, *pb = a + 11, *pe = a + 14;
  float p = op->n_f > 0 ? op->fattr[0] : 2.0f;
  int32_t in[3], out[3];
  if (!spatial3(x, in) || !spatial3(y, out)) return EA_ERR_INTERNAL;
  int32_t planes = x->dims[0] * x->dims[1];
  int32_t in_plane = in[0] * in[1] * in[2], out_plane = out[0] * out[1] * out[2];
  if (planes == 0 || out_plane == 0) return EA_OK;
  if (kind == KIND_MAX && x->dtype == EA_F32 && maxpool_fast(x, y, in, out, k, s, d, pb)) return EA_OK;

  /* Per output index along D and H: the taps inside the input; along W: per tap, the outputs it reaches. */
  uint32_t n_taps = (uint32_t)(out[0] + out[1] + out[2]);
  taps_t *taps = ea_scratch(n_taps * (uint32_t)sizeof(taps_t) + (uint32_t)(2 * k[2]) * 4u + (uint32_t)out[2] * 4u);
  if (!taps) return EA_ERR_NOMEM;
  taps_t *td = taps, *th = taps + out[0], *tw = th + out[1];
  int32_t *wlo = (int32_t *)(tw + out[2]), *whi = wlo + k[2];
  float *wdiv = (float *)(whi + k[2]);
  for (int32_t o = 0; o < out[0]; o++) window_taps(o, in[0], k[0], s[0], d[0], pb[0], pe[0], &td[o]);
  for (int32_t o = 0; o < out[1]; o++) window_taps(o, in[1], k[1], s[1], d[1], pb[1], pe[1], &th[o]);
  for (int32_t o = 0; o < out[2]; o++) {
    window_taps(o, in[2], k[2], s[2], d[2], pb[2], pe[2], &tw[o]);
    int32_t valid = 0;
    for (int32_t j = tw[o].lo; j < tw[o].hi; j++) {
      int32_t i = o * s[2] - pb[2] + j * d[2];
      valid += i >= 0 && i < in[2];
    }
    wdiv[o] = (float)(include_pad ? tw[o].cnt : valid);
  }
  for (int32_t j = 0; j < k[2]; j++) out_range(j * d[2] - pb[2], s[2], in[2], out[2], &wlo[j], &whi[j]);

  for (int32_t pl = 0; pl < planes; pl++) {
    for (int32_t od = 0; od < out[0]; od++) {
      for (int32_t oh = 0; oh < out[1]; oh++) {
        int32_t o_row = pl * out_plane + (od * out[1] + oh) * out[2];
        int32_t n_dh = 0;
        if (x->dtype != EA_F32) {
          int32_t first = 1;
          for (int32_t jd = td[od].lo; jd < td[od].hi; jd++) {
            int32_t id = od * s[0] - pb[0] + jd * d[0];
            if (id < 0 || id >= in[0]) continue;
            for (int32_t jh = th[oh].lo; jh < th[oh].hi; jh++) {
              int32_t ih = oh * s[1] - pb[1] + jh * d[1];
              if (ih < 0 || ih >= in[1]) continue;
              size_t base = (size_t)pl * in_plane + (size_t)(id * in[1] + ih) * in[2];
              if (x->dtype == EA_U8) {
                const uint8_t *src = (const uint8_t *)x->data + base;
                uint8_t *acc = (uint8_t *)y->data + o_row;
                if (first)
                  for (int32_t o = 0; o < out[2]; o++) acc[o] = 0;
                for (int32_t j = 0; j < k[2]; j++)
                  for (int32_t o = wlo[j]; o < whi[j]; o++) {
                    uint8_t v = src[o * s[2] + j * d[2] - pb[2]];
                    if (v > acc[o]) acc[o] = v;
                  }
              } else {
                const int8_t *src = (const int8_t *)x->data + base;
                int8_t *acc = (int8_t *)y->data + o_row;
                if (first)
                  for (int32_t o = 0; o < out[2]; o++) acc[o] = -128;
                for (int32_t j = 0; j < k[2]; j++)
                  for (int32_t o = wlo[j]; o < whi[j]; o++) {
                    int8_t v = src[o * s[2] + j * d[2] - pb[2]];
                    if (v > acc[o]) acc[o] = v;
                  }
              }
              first = 0;
            }
          }
          if (first) {
            /* The window lies in the padding: the type's lowest value, as onnxruntime. */
            if (x->dtype == EA_U8)
              for (int32_t o = 0; o < out[2]; o++) ((uint8_t *)y->data)[o_row + o] = 0;
            else
              for (int32_t o = 0; o < out[2]; o++) ((int8_t *)y->data)[o_row + o] = -128;
          }
          continue;
        }
        float *acc = (float *)y->data + o_row;
        float init = kind == KIND_MAX ? -FLT_MAX : 0.0f;
        for (int32_t o = 0; o < out[2]; o++) acc[o] = init;
        for (int32_t jd = td[od].lo; jd < td[od].hi; jd++) {
          int32_t id = od * s[0] - pb[0] + jd * d[0];
          if (id < 0 || id >= in[0]) continue;
          for (int32_t jh = th[oh].lo; jh < th[oh].hi; jh++) {
            int32_t ih = oh * s[1] - pb[1] + jh * d[1];
            if (ih < 0 || ih >= in[1]) continue;
            n_dh++;
            const float *src = (const float *)x->data + (size_t)pl * in_plane + (size_t)(id * in[1] + ih) * in[2];
            for (int32_t j = 0; j < k[2]; j++) {
              int32_t lo = wlo[j], hi = whi[j];
              if (hi <= lo) continue;
              const float *from = src + lo * s[2] + j * d[2] - pb[2];
              if (kind == KIND_MAX) row_max(acc + lo, from, hi - lo, s[2]);
              else if (kind == KIND_AVG) row_sum(acc + lo, from, hi - lo, s[2]);
              else row_lp(acc + lo, from, hi - lo, s[2], p);
            }
          }
        }
        if (kind == KIND_AVG) {
          float dh = (float)(include_pad ? td[od].cnt * th[oh].cnt : n_dh);
          for (int32_t o = 0; o < out[2]; o++) acc[o] = acc[o] / (dh * wdiv[o]);
        } else if (kind == KIND_LP) {
          if (p == 2.0f)
            for (int32_t o = 0; o < out[2]; o++) acc[o] = sqrtf(acc[o]);
          else if (p != 1.0f)
            for (int32_t o = 0; o < out[2]; o++) acc[o] = powf(acc[o], 1.0f / p);
        }
      }
    }
  }
  return EA_OK;
}

static int32_t op_global_pool(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  if (op->n_i < 1 || x->rank < 2 || x->dims[0] * x->dims[1] != y->count || x->dtype != EA_F32 || y->dtype != EA_F32)
    return EA_ERR_INTERNAL;
  int32_t kind = op->iattr[0];
  float p = op->n_f > 0 ? op->fattr[0] : 2.0f;
  int32_t planes = y->count;
  int32_t n = planes ? x->count / planes : 0;
  const float *xs = x->data;
  float *ys = y->data;
  for (int32_t pl = 0; pl < planes; pl++) {
    const float *src = xs + (size_t)pl * n;
    int32_t i = 0;
    if (kind == KIND_MAX) {
      float m = -FLT_MAX;
      if (n >= 4) {
        v128_t v = wasm_v128_load(src);
        for (i = 4; i + 4 <= n; i += 4) v = wasm_f32x4_pmax(v, wasm_v128_load(src + i));
        float l[4];
        wasm_v128_store(l, v);
        m = EA_MAX(EA_MAX(l[0], l[1]), EA_MAX(l[2], l[3]));
      }
      for (; i < n; i++) m = src[i] > m ? src[i] : m;
      ys[pl] = m;
    } else {
      double total = 0;
      while (i < n) {
        /* float lanes over blocks, double across blocks. */
        int32_t end = EA_MIN(n, i + 1024);
        v128_t v = wasm_f32x4_splat(0.0f);
        float t = 0;
        if (kind == KIND_AVG) {
          for (; i + 4 <= end; i += 4) v = wasm_f32x4_add(v, wasm_v128_load(src + i));
          for (; i < end; i++) t += src[i];
        } else if (p == 2.0f) {
          for (; i + 4 <= end; i += 4) {
            v128_t w = wasm_v128_load(src + i);
            v = wasm_f32x4_add(v, wasm_f32x4_mul(w, w));
          }
          for (; i < end; i++) t += src[i] * src[i];
        } else {
          for (; i < end; i++) t += p == 1.0f ? fabsf(src[i]) : powf(fabsf(src[i]), p);
        }
        float l[4];
        wasm_v128_store(l, v);
        total += (double)l[0] + (double)l[1] + (double)l[2] + (double)l[3] + (double)t;
      }
      if (kind == KIND_AVG) ys[pl] = n ? (float)(total / n) : 0.0f;
      else ys[pl] = p == 2.0f ? (float)sqrt(total) : p == 1.0f ? (float)total : powf((float)total, 1.0f / p);
    }
  }
  return EA_OK;
}

/* dst[o * s] += src[o] for o in [0, n). */
static void scatter_add(float *dst, const float *src, int32_t n, int32_t s) {
  int32_t o = 0;
  if (s == 1) {
    for (; o + 4 <= n; o += 4) wasm_v128_store(dst + o, wasm_f32x4_add(wasm_v128_load(dst + o), wasm_v128_load(src + o)));
  } else if (s == 2) {
    /* Touches dst[0 .. 2n-1): the last vector's odd lane stays inside the range. */
    v128_t z = wasm_f32x4_splat(0);
    for (; o + 4 < n; o += 4) {
      v128_t v = wasm_v128_load(src + o);
      float *p = dst + 2 * o;
      wasm_v128_store(p, wasm_f32x4_add(wasm_v128_load(p), wasm_i32x4_shuffle(v, z, 0, 4, 1, 4)));
      wasm_v128_store(p + 4, wasm_f32x4_add(wasm_v128_load(p + 4), wasm_i32x4_shuffle(v, z, 2, 4, 3, 4)));
    }
  }
  for (; o < n; o++) dst[o * s] += src[o];
}

static int32_t op_conv_transpose(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0], *w = op->in[1], *bias = op->n_in > 2 ? op->in[2] : 0;
  ea_tensor_t *y = op->out[0];
  if (op->n_i < 14 || x->dtype != EA_F32 || w->dtype != EA_F32 || y->dtype != EA_F32 || x->rank != y->rank ||
      x->dims[0] != y->dims[0])
    return EA_ERR_INTERNAL;
  const int32_t *a = op->iattr;
  int32_t group = a[0];
  const int32_t *k = a + 1, *s = a + 4, *d = a + 7, *pb = a + 10;
  int32_t co_blk = a[13];
  int32_t in[3], out[3];
  if (!spatial3(x, in) || !spatial3(y, out) || group < 1 || co_blk < 1) return EA_ERR_INTERNAL;
  int32_t batch = x->dims[0], cin = x->dims[1], cout = y->dims[1];
  int32_t cin_g = cin / group, cout_g = cout / group, kvol = k[0] * k[1] * k[2];
  int32_t s_in = in[0] * in[1] * in[2], s_out = out[0] * out[1] * out[2];
  if (cin_g * group != cin || cout_g * group != cout) return EA_ERR_INTERNAL;
  if (bias && bias->count != cout) return EA_ERR_INTERNAL;
  if (co_blk > cout_g) co_blk = cout_g;
  int32_t raw = op->n_i > 14 && op->iattr[14];
  int32_t m_g = cout_g * kvol;
  int32_t full_block = ea_gemm_packed_a_size(co_blk * kvol, cin_g);
  int32_t n_full = cout_g / co_blk, tail = cout_g - n_full * co_blk;
  int32_t group_size = n_full * full_block + (tail ? ea_gemm_packed_a_size(tail * kvol, cin_g) : 0);
  if (w->count != (raw ? group * m_g * cin_g : group * group_size)) return EA_ERR_INTERNAL;
  const float *ws = w->data;
  float *packed = 0;
  if (raw) {
    packed = ea_scratch((uint32_t)full_block * 4u);
    if (!packed) return EA_ERR_NOMEM;
  }
  float *cols = ea_scratch((uint32_t)co_blk * (uint32_t)kvol * (uint32_t)s_in * 4u + (uint32_t)(2 * k[2]) * 4u);
  if (!cols) return EA_ERR_NOMEM;
  int32_t *wlo = (int32_t *)(cols + (size_t)co_blk * kvol * s_in), *whi = wlo + k[2];
  /* Along W, tap j sends input iw to output iw * s + j * d - pb: the inputs that land inside. */
  for (int32_t j = 0; j < k[2]; j++) out_range(j * d[2] - pb[2], s[2], out[2], in[2], &wlo[j], &whi[j]);
  const float *xs = x->data, *bs = bias ? bias->data : 0;
  float *ys = y->data;

  for (int32_t n = 0; n < batch; n++) {
    for (int32_t c = 0; c < cout; c++) {
      float v = bs ? bs[c] : 0.0f;
      float *plane = ys + ((size_t)n * cout + c) * s_out;
      for (int32_t i = 0; i < s_out; i++) plane[i] = v;
    }
    if (s_in == 0) continue;
    for (int32_t g = 0; g < group; g++) {
      const float *xg = xs + ((size_t)n * cin + (size_t)g * cin_g) * s_in;
      for (int32_t c0 = 0; c0 < cout_g; c0 += co_blk) {
        int32_t cb = EA_MIN(co_blk, cout_g - c0);
        const float *ag;
        if (raw) {
          /* A(i, ci) = W[g*Cin_g + ci][c0*K + i] */
          ea_gemm_pack_a(ws + (size_t)g * cin_g * m_g + (size_t)c0 * kvol, cb * kvol, cin_g, 1, m_g, packed);
          ag = packed;
        } else {
          ag = ws + (size_t)g * group_size + (size_t)(c0 / co_blk) * full_block;
        }
        ea_gemm_t gm = {0};
        gm.M = cb * kvol;
        gm.N = s_in;
        gm.K = cin_g;
        gm.a = ag;
        gm.b = xg;
        gm.ldb = s_in;
        gm.c = cols;
        gm.ldc = s_in;
        gm.alpha = 1.0f;
        int32_t status = ea_gemm(&gm);
        if (status != EA_OK) return status;
        for (int32_t c = 0; c < cb; c++) {
          float *plane = ys + ((size_t)n * cout + (size_t)g * cout_g + c0 + c) * s_out;
          for (int32_t jd = 0; jd < k[0]; jd++)
            for (int32_t jh = 0; jh < k[1]; jh++)
              for (int32_t jw = 0; jw < k[2]; jw++) {
                const float *row = cols + ((size_t)((c * k[0] + jd) * k[1] + jh) * k[2] + jw) * s_in;
                int32_t lo = wlo[jw], hi = whi[jw];
                if (hi <= lo) continue;
                for (int32_t id = 0; id < in[0]; id++) {
                  int32_t od = id * s[0] + jd * d[0] - pb[0];
                  if (od < 0 || od >= out[0]) continue;
                  for (int32_t ih = 0; ih < in[1]; ih++) {
                    int32_t oh = ih * s[1] + jh * d[1] - pb[1];
                    if (oh < 0 || oh >= out[1]) continue;
                    float *dst = plane + (size_t)(od * out[1] + oh) * out[2] + lo * s[2] + jw * d[2] - pb[2];
                    scatter_add(dst, row + (id * in[1] + ih) * in[2] + lo, hi - lo, s[2]);
                  }
                }
              }
        }
      }
    }
  }
  return EA_OK;
}

ea_kernel_fn ea_ops_pool(uint32_t opcode) {
  switch (opcode & 63u) {
  case OP_POOL: return op_pool;
  case OP_GLOBAL_POOL: return op_global_pool;
  case OP_CONV_TRANSPOSE: return op_conv_transpose;
  default: return 0;
  }
}
