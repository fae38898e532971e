/*
 * ops_conv.c: the "conv" op family (plan.h). Opcodes and attribute layouts:
 * agent/convert/ops/conv.py.
 *
 * Conv (1-D as 2-D with height 1) is a GEMM per image and group: Y[Cout_g, P] =
 * W[Cout_g, K] . col[K, P] with K = Cin_g*kh*kw and P = Ho*Wo, the weights packed
 * at build time as ea_gemm's A panels. col is the input itself for a 1x1 stride-1
 * unpadded conv, else an im2col copy (one row per (channel, ky, kx), built in
 * scratch). Depthwise convolutions (one input channel per group) run a direct
 * kernel instead, vectorised along the output row.
 */
#include "ea_gemm.h"

enum {
  OP_CONV = 0,    /* GEMM convolution */
  OP_CONV_DW = 1, /* depthwise: group == Cin */
};

/* Shared iattr layout. */
enum {
  A_CIN,
  A_H,
  A_W,
  A_COUT,
  A_HO,
  A_WO,
  A_KH,
  A_KW,
  A_SH,
  A_SW,
  A_DH,
  A_DW,
  A_PT,
  A_PL,
  A_GROUP,
  A_ACT_MODE,
  A_ACT_KIND,
  A_COUNT
};

/* Rows of col for input channels [0, cin) of x: col[(c*kh + ky)*kw + kx][oy*wo + ox]. */
static void im2col(const float *x, int32_t cin, const int32_t *at, float *col) {
  const int32_t H = at[A_H], W = at[A_W], Ho = at[A_HO], Wo = at[A_WO];
  const int32_t kh = at[A_KH], kw = at[A_KW], sh = at[A_SH], sw = at[A_SW], dh = at[A_DH], dw = at[A_DW];
  const int32_t pt = at[A_PT], pl = at[A_PL];
  const size_t P = (size_t)Ho * Wo;
  for (int32_t c = 0; c < cin; c++) {
    const float *plane = x + (size_t)c * H * W;
    for (int32_t ky = 0; ky < kh; ky++) {
      for (int32_t kx = 0; kx < kw; kx++) {
        float *row = col + ((size_t)(c * kh + ky) * kw + kx) * P;
        /* Output columns whose input column is inside: ox in [lo, hi). */
        int32_t off = kx * dw - pl;
        int32_t lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
        int32_t hi = W - off <= 0 ? 0 : (W - off + sw - 1) / sw;
        if (hi > Wo) hi = Wo;
        if (lo > hi) lo = hi;
        for (int32_t oy = 0; oy < Ho; oy++) {
          float *o = row + (size_t)oy * Wo;
          int32_t iy = oy * sh - pt + ky * dh;
          if (iy < 0 || iy >= H) {
            for (int32_t ox = 0; ox < Wo; ox++) o[ox] = 0.0f;
            continue;
          }
          const float *src = plane + (size_t)iy * W + off;
          for (int32_t ox = 0; ox < lo; ox++) o[ox] = 0.0f;
          if (sw == 1) {
            memcpy(o + lo, src + lo, (size_t)(hi - lo) * 4u);
          } else {
            for (int32_t ox = lo; ox < hi; ox++) o[ox] = src[ox * sw];
          }
          for (int32_t ox = hi; ox < Wo; ox++) o[ox] = 0.0f;
        }
      }
    }
  }
}

/*
 * OP_CONV
 *   in:  X [N, Cin, H, W] (or [N, Cin, W]: H = 1), W packed (group, ceil(Cout_g/MR) panels of
 *        [K][MR]), bias [Cout] (or absent), residual (Y's shape, added before the activation; or absent)
 *   out: Y [N, Cout, Ho, Wo]
 *   iattr: A_* above; fattr: act lo, hi, slope, alpha, beta
 */
static int32_t op_conv(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0], *w = op->in[1], *bias = op->in[2];
  const ea_tensor_t *res = op->n_in > 3 ? op->in[3] : 0;
  ea_tensor_t *y = op->out[0];
  const int32_t *at = op->iattr;
  const int32_t cin = at[A_CIN], cout = at[A_COUT], group = at[A_GROUP];
  const int32_t cin_g = cin / group, cout_g = cout / group;
  const int32_t K = cin_g * at[A_KH] * at[A_KW];
  const int32_t P = at[A_HO] * at[A_WO];
  const int32_t in_image = cin * at[A_H] * at[A_W], out_image = cout * P;
  if (in_image <= 0 || out_image <= 0) return EA_OK;
  const int32_t batch = x->count / in_image;
  if (batch * out_image != y->count) return EA_ERR_INTERNAL;
  const int direct = at[A_KH] == 1 && at[A_KW] == 1 && at[A_SH] == 1 && at[A_SW] == 1 && at[A_PT] == 0 &&
                     at[A_PL] == 0 && at[A_HO] == at[A_H] && at[A_WO] == at[A_W];
  float *col = 0;
  if (!direct) {
    col = ea_scratch((uint32_t)K * (uint32_t)P * 4u);
    if (!col) return EA_ERR_NOMEM;
  }
  ea_gemm_t g = {0};
  ea_act_read(op, A_ACT_MODE, 0, &g.act);
  g.M = cout_g;
  g.N = P;
  g.K = K;
  g.alpha = 1.0f;
  g.ldb = P;
  g.ldc = P;
  g.ld_init = P;
  const int32_t panel_floats = ea_gemm_packed_a_size(cout_g, K);
  for (int32_t n = 0; n < batch; n++) {
    for (int32_t gi = 0; gi < group; gi++) {
      const float *xg = (const float *)x->data + (size_t)n * in_image + (size_t)gi * cin_g * at[A_H] * at[A_W];
      size_t out_off = (size_t)n * out_image + (size_t)gi * cout_g * P;
      if (!direct) im2col(xg, cin_g, at, col);
      g.a = (const float *)w->data + (size_t)gi * panel_floats;
      g.b = direct ? xg : col;
      g.c = (float *)y->data + out_off;
      g.bias_row = bias ? (const float *)bias->data + (size_t)gi * cout_g : 0;
      g.init = res ? (const float *)res->data + out_off : 0;
      int32_t status = ea_gemm(&g);
      if (status != EA_OK) return status;
    }
  }
  return EA_OK;
}

/* One output row of a depthwise conv, taps w[kh*kw], for input plane x. */
static void dw_row(const float *x, const float *w, float b, const int32_t *at, int32_t oy, float *o) {
  const int32_t H = at[A_H], W = at[A_W], Wo = at[A_WO];
  const int32_t kh = at[A_KH], kw = at[A_KW], sh = at[A_SH], sw = at[A_SW], dh = at[A_DH], dw = at[A_DW];
  const int32_t pt = at[A_PT], pl = at[A_PL];
  /* Output columns whose every tap is inside: ox in [lo, hi). */
  int32_t lo = pl > 0 ? (pl + sw - 1) / sw : 0;
  int32_t span = (kw - 1) * dw; /* ix = ox*sw - pl + kx*dw <= W-1 for kx = kw-1 */
  int32_t hi = W - 1 - span + pl >= 0 ? (W - 1 - span + pl) / sw + 1 : 0;
  if (hi > Wo) hi = Wo;
  if (lo > hi) lo = hi;
  for (int32_t ox = 0; ox < Wo; ox++) o[ox] = b;
  for (int32_t ky = 0; ky < kh; ky++) {
    int32_t iy = oy * sh - pt + ky * dh;
    if (iy < 0 || iy >= H) continue;
    const float *xr = x + (size_t)iy * W;
    for (int32_t kx = 0; kx < kw; kx++) {
      float wv = w[ky * kw + kx];
      int32_t off = kx * dw - pl;
      /* Edges: bounds-checked. */
      for (int32_t ox = 0; ox < lo; ox++) {
        int32_t ix = ox * sw + off;
        if (ix >= 0 && ix < W) o[ox] += wv * xr[ix];
      }
      for (int32_t ox = hi > lo ? hi : lo; ox < Wo; ox++) {
        int32_t ix = ox * sw + off;
        if (ix >= 0 && ix < W) o[ox] += wv * xr[ix];
      }
      /* Interior: every tap inside. */
      v128_t wvv = wasm_f32x4_splat(wv);
      int32_t ox = lo;
      if (sw == 1) {
        for (; ox + 4 <= hi; ox += 4)
          wasm_v128_store(o + ox, wasm_f32x4_add(wasm_v128_load(o + ox), wasm_f32x4_mul(wvv, wasm_v128_load(xr + ox + off))));
      } else if (sw == 2) {
        for (; ox + 4 <= hi && (ox + 3) * 2 + off + 1 < W; ox += 4) {
          const float *s = xr + ox * 2 + off;
          v128_t even = wasm_i32x4_shuffle(wasm_v128_load(s), wasm_v128_load(s + 4), 0, 2, 4, 6);
          wasm_v128_store(o + ox, wasm_f32x4_add(wasm_v128_load(o + ox), wasm_f32x4_mul(wvv, even)));
        }
      }
      for (; ox < hi; ox++) o[ox] += wv * xr[ox * sw + off];
    }
  }
}

/*
 * OP_CONV_DW
 *   in:  X [N, C, H, W], W [Cout, kh*kw] (Cout = C * multiplier), bias [Cout] (or absent),
 *        residual (or absent)
 *   out: Y [N, Cout, Ho, Wo]; iattr and fattr as OP_CONV
 */
static int32_t op_conv_dw(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0], *w = op->in[1], *bias = op->in[2];
  const ea_tensor_t *res = op->n_in > 3 ? op->in[3] : 0;
  ea_tensor_t *y = op->out[0];
  const int32_t *at = op->iattr;
  const int32_t cin = at[A_CIN], cout = at[A_COUT], mult = cout / cin;
  const int32_t plane_in = at[A_H] * at[A_W], P = at[A_HO] * at[A_WO], taps = at[A_KH] * at[A_KW];
  if (cin * plane_in <= 0 || cout * P <= 0) return EA_OK;
  const int32_t batch = x->count / (cin * plane_in);
  ea_act_t act;
  ea_act_read(op, A_ACT_MODE, 0, &act);
  const float *wv = w->data, *bv = bias ? bias->data : 0;
  for (int32_t n = 0; n < batch; n++) {
    for (int32_t oc = 0; oc < cout; oc++) {
      const float *xp = (const float *)x->data + ((size_t)n * cin + oc / mult) * plane_in;
      size_t out_off = ((size_t)n * cout + oc) * P;
      float *yp = (float *)y->data + out_off;
      for (int32_t oy = 0; oy < at[A_HO]; oy++)
        dw_row(xp, wv + (size_t)oc * taps, bv ? bv[oc] : 0.0f, at, oy, yp + (size_t)oy * at[A_WO]);
      if (res) {
        const float *r = (const float *)res->data + out_off;
        for (int32_t i = 0; i < P; i++) yp[i] += r[i];
      }
      ea_act_apply(&act, yp, P);
    }
  }
  return EA_OK;
}

ea_kernel_fn ea_ops_conv(uint32_t opcode) {
  switch (opcode & 63u) {
  case OP_CONV: return op_conv;
  case OP_CONV_DW: return op_conv_dw;
  default: return ea_ops_pool(opcode); /* opcodes 32..63: ops_pool.c */
  }
}
