/*
 * ea_kernels.c — float32 kernels for wasm32 + simd128. See ea_kernels.h.
 *
 * Design notes (why the code looks the way it does):
 *  - The dense layer keeps W as [in][out], so a row of W is contiguous along
 *    the outputs: we vectorise over outputs and broadcast one input value at
 *    a time. That needs no horizontal reductions, which are slow in wasm.
 *  - Register tiles are at most 2 rows x 16 outputs (8 accumulators). x86-64
 *    has 16 xmm registers and Cranelift does not spill cleverly, so bigger
 *    tiles lose more to spills than they gain in reuse.
 *  - Remainders are handled without scalar loops where possible: the last
 *    1..3 output columns are recomputed by a 4-wide tile that overlaps the
 *    previous one (same arithmetic, so the overlapping values are identical),
 *    and row tails in softmax/relu go through a padded 4-float buffer.
 *  - wasm has no FMA in simd128, so each multiply-add is mul then add; the
 *    results therefore do not depend on the host CPU.
 */
#include "ea_kernels.h"

#include <wasm_simd128.h>

#define EA_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ exp */

EA_INLINE v128_t exp_f32x4(v128_t x) {
  /* pmin/pmax keep NaN (they return the first operand when the compare is
   * false), so NaN flows through to the result. The clamp bounds make
   * exp(-104) round to exactly 0 and exp(88.73) overflow to +inf. */
  x = wasm_f32x4_pmax(x, wasm_f32x4_splat(-104.0f));
  x = wasm_f32x4_pmin(x, wasm_f32x4_splat(88.73f));
  const v128_t n = wasm_f32x4_nearest(wasm_f32x4_mul(x, wasm_f32x4_splat(1.44269504088896341f)));
  /* Cody-Waite: ln2 = C1 + C2 with C1 short enough that n * C1 is exact. */
  v128_t r = wasm_f32x4_sub(x, wasm_f32x4_mul(n, wasm_f32x4_splat(0.693359375f)));
  r = wasm_f32x4_add(r, wasm_f32x4_mul(n, wasm_f32x4_splat(2.12194440e-4f)));
  v128_t p = wasm_f32x4_splat(1.9875691500e-4f);
  p = wasm_f32x4_add(wasm_f32x4_mul(p, r), wasm_f32x4_splat(1.3981999507e-3f));
  p = wasm_f32x4_add(wasm_f32x4_mul(p, r), wasm_f32x4_splat(8.3334519073e-3f));
  p = wasm_f32x4_add(wasm_f32x4_mul(p, r), wasm_f32x4_splat(4.1665795894e-2f));
  p = wasm_f32x4_add(wasm_f32x4_mul(p, r), wasm_f32x4_splat(1.6666665459e-1f));
  p = wasm_f32x4_add(wasm_f32x4_mul(p, r), wasm_f32x4_splat(5.0000001201e-1f));
  v128_t y = wasm_f32x4_add(wasm_f32x4_add(wasm_f32x4_mul(p, wasm_f32x4_mul(r, r)), r),
                            wasm_f32x4_splat(1.0f));
  /* Scale by 2^n in two halves: n spans [-150, 128], which a single
   * exponent field cannot hold, but each half (at most 75 in magnitude)
   * can; the second multiply then rounds into subnormals or +inf exactly
   * as a single correctly rounded scale would. NaN converts to n = 0. */
  const v128_t ni = wasm_i32x4_trunc_sat_f32x4(n);
  const v128_t hi = wasm_i32x4_shr(ni, 1);
  const v128_t lo = wasm_i32x4_sub(ni, hi);
  const v128_t bias = wasm_i32x4_splat(127);
  y = wasm_f32x4_mul(y, wasm_i32x4_shl(wasm_i32x4_add(hi, bias), 23));
  return wasm_f32x4_mul(y, wasm_i32x4_shl(wasm_i32x4_add(lo, bias), 23));
}

/* Loads the last n (1..3) floats of a row into a vector padded with `pad`.
 * A plain v128 load could read past the end of linear memory and trap; lane
 * inserts (rather than a stack buffer) keep memcpy/memset out of the module. */
EA_INLINE v128_t load_tail(const float *p, int32_t n, float pad) {
  v128_t v = wasm_f32x4_splat(pad);
  v = wasm_f32x4_replace_lane(v, 0, p[0]);
  if (n > 1) v = wasm_f32x4_replace_lane(v, 1, p[1]);
  if (n > 2) v = wasm_f32x4_replace_lane(v, 2, p[2]);
  return v;
}

EA_INLINE void store_tail(float *p, int32_t n, v128_t v) {
  p[0] = wasm_f32x4_extract_lane(v, 0);
  if (n > 1) p[1] = wasm_f32x4_extract_lane(v, 1);
  if (n > 2) p[2] = wasm_f32x4_extract_lane(v, 2);
}

void ea_exp_f32(const float *x, float *y, int32_t n) {
  int32_t i = 0;
  for (; i + 4 <= n; i += 4) wasm_v128_store(y + i, exp_f32x4(wasm_v128_load(x + i)));
  if (i < n) store_tail(y + i, n - i, exp_f32x4(load_tail(x + i, n - i, 0.0f)));
}

/* ----------------------------------------------------------------- relu */

EA_INLINE v128_t relu_f32x4(v128_t v) {
  /* f32x4.max (not pmax) so NaN propagates like numpy.maximum. */
  return wasm_f32x4_max(v, wasm_f32x4_splat(0.0f));
}

void ea_relu_f32(const float *x, float *y, int32_t n) {
  int32_t i = 0;
  for (; i + 4 <= n; i += 4) wasm_v128_store(y + i, relu_f32x4(wasm_v128_load(x + i)));
  if (i < n) store_tail(y + i, n - i, relu_f32x4(load_tail(x + i, n - i, 0.0f)));
}

/* ---------------------------------------------------------------- dense */

/*
 * One R x (4*V) tile of y = act(x @ w + b). x points at the tile's first
 * row, w/b/y at the tile's first column; ldx/ldw/ldy are row strides in
 * floats. R and V are compile-time constants at every call site, so the
 * accumulator arrays become registers and the loops fully unroll.
 */
EA_INLINE void dense_tile(const float *x, int32_t ldx, const float *w, int32_t ldw, const float *b, float *y,
                          int32_t ldy, int32_t in, const int R, const int V, const int relu) {
  v128_t acc[2][4];
  for (int v = 0; v < V; v++) {
    const v128_t init = b ? wasm_v128_load(b + 4 * v) : wasm_f32x4_splat(0.0f);
    for (int r = 0; r < R; r++) acc[r][v] = init;
  }
  for (int32_t i = 0; i < in; i++, w += ldw) {
    v128_t xs[2];
    for (int r = 0; r < R; r++) xs[r] = wasm_f32x4_splat(x[r * ldx + i]);
    for (int v = 0; v < V; v++) {
      const v128_t wv = wasm_v128_load(w + 4 * v);
      for (int r = 0; r < R; r++) acc[r][v] = wasm_f32x4_add(acc[r][v], wasm_f32x4_mul(xs[r], wv));
    }
  }
  for (int r = 0; r < R; r++) {
    for (int v = 0; v < V; v++) {
      wasm_v128_store(y + r * ldy + 4 * v, relu ? relu_f32x4(acc[r][v]) : acc[r][v]);
    }
  }
}

/* Outputs narrower than one vector: scalar dot products, but the same
 * mul-then-add order as the vector path. */
EA_INLINE void dense_narrow(const float *x, const float *w, const float *b, float *y, int32_t rows, int32_t in,
                            int32_t out, const int relu) {
  for (int32_t r = 0; r < rows; r++) {
    for (int32_t o = 0; o < out; o++) {
      float s = b ? b[o] : 0.0f;
      for (int32_t i = 0; i < in; i++) s += x[r * in + i] * w[i * out + o];
      if (relu) s = wasm_f32x4_extract_lane(relu_f32x4(wasm_f32x4_splat(s)), 0);
      y[r * out + o] = s;
    }
  }
}

/* All output columns for R (1 or 2) rows; requires out >= 4. */
EA_INLINE void dense_rows(const float *x, const float *w, const float *b, float *y, int32_t in, int32_t out,
                          const int R, const int relu) {
  int32_t o = 0;
  for (; o + 16 <= out; o += 16) dense_tile(x, in, w + o, out, b ? b + o : 0, y + o, out, in, R, 4, relu);
  if (o + 8 <= out) {
    dense_tile(x, in, w + o, out, b ? b + o : 0, y + o, out, in, R, 2, relu);
    o += 8;
  }
  if (o + 4 <= out) {
    dense_tile(x, in, w + o, out, b ? b + o : 0, y + o, out, in, R, 1, relu);
    o += 4;
  }
  if (o < out) {
    /* 1..3 columns left: redo the last 4 columns; the overlap gets the
     * same values it already holds. */
    o = out - 4;
    dense_tile(x, in, w + o, out, b ? b + o : 0, y + o, out, in, R, 1, relu);
  }
}

EA_INLINE void dense_impl(const float *x, const float *w, const float *b, float *y, int32_t rows, int32_t in,
                          int32_t out, const int relu) {
  if (out < 4) {
    dense_narrow(x, w, b, y, rows, in, out, relu);
    return;
  }
  int32_t r = 0;
  for (; r + 2 <= rows; r += 2) dense_rows(x + r * in, w, b, y + r * out, in, out, 2, relu);
  if (r < rows) dense_rows(x + r * in, w, b, y + r * out, in, out, 1, relu);
}

void ea_dense_f32(const float *x, const float *w, const float *b, float *y, int32_t rows, int32_t in,
                  int32_t out, ea_act_t act) {
  if (rows <= 0 || out <= 0) return;
  /* Two instantiations, so the activation test is not in the inner loop. */
  if (act == EA_ACT_RELU) {
    dense_impl(x, w, b, y, rows, in, out, 1);
  } else {
    dense_impl(x, w, b, y, rows, in, out, 0);
  }
}

/* -------------------------------------------------------------- softmax */

EA_INLINE float hmax(v128_t v) {
  v = wasm_f32x4_max(v, wasm_i32x4_shuffle(v, v, 2, 3, 0, 1));
  v = wasm_f32x4_max(v, wasm_i32x4_shuffle(v, v, 1, 0, 3, 2));
  return wasm_f32x4_extract_lane(v, 0);
}

EA_INLINE float hsum(v128_t v) {
  v = wasm_f32x4_add(v, wasm_i32x4_shuffle(v, v, 2, 3, 0, 1));
  v = wasm_f32x4_add(v, wasm_i32x4_shuffle(v, v, 1, 0, 3, 2));
  return wasm_f32x4_extract_lane(v, 0);
}

void ea_softmax_rows_f32(const float *x, float *y, int32_t rows, int32_t cols) {
  if (cols <= 0) return;
  const int32_t full = cols & ~3;
  const int32_t tail = cols - full;
  for (int32_t r = 0; r < rows; r++, x += cols, y += cols) {
    /* Tail lanes are padded with -inf: neutral for max, and exp(-inf) = 0
     * keeps them out of the sum. */
    v128_t t = tail ? load_tail(x + full, tail, -__builtin_inff()) : wasm_f32x4_splat(-__builtin_inff());
    v128_t m = t;
    for (int32_t j = 0; j < full; j += 4) m = wasm_f32x4_max(m, wasm_v128_load(x + j));
    const v128_t mv = wasm_f32x4_splat(hmax(m));

    /* exp pass writes y (which may be x: each chunk is read before written). */
    t = exp_f32x4(wasm_f32x4_sub(t, mv));
    v128_t s = t;
    for (int32_t j = 0; j < full; j += 4) {
      const v128_t e = exp_f32x4(wasm_f32x4_sub(wasm_v128_load(x + j), mv));
      s = wasm_f32x4_add(s, e);
      wasm_v128_store(y + j, e);
    }
    /* Divide rather than multiply by the reciprocal: one rounding, like
     * the NumPy/ONNX references. */
    const v128_t sv = wasm_f32x4_splat(hsum(s));
    for (int32_t j = 0; j < full; j += 4) wasm_v128_store(y + j, wasm_f32x4_div(wasm_v128_load(y + j), sv));
    if (tail) store_tail(y + full, tail, wasm_f32x4_div(t, sv));
  }
}

/* --------------------------------------------------------------- argmax */

void ea_argmax_rows_f32_i64(const float *x, int64_t *out, int32_t rows, int32_t cols) {
  /* Scalar on purpose: rows are short (class scores), and a vector max
   * followed by an index search would touch each row twice. */
  for (int32_t r = 0; r < rows; r++, x += cols) {
    int32_t best = 0;
    if (cols > 0) {
      float bv = x[0];
      /* numpy.argmax semantics: first maximum wins; a NaN is the maximum,
       * so the first NaN wins. */
      if (bv == bv) {
        for (int32_t j = 1; j < cols; j++) {
          const float v = x[j];
          if (!(v <= bv)) {
            best = j;
            bv = v;
            if (v != v) break;
          }
        }
      }
    }
    out[r] = best;
  }
}
