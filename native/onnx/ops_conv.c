/*
 * ops_conv.c: the "conv" op family (plan.h). Opcodes and attribute layouts:
 * agent/convert/ops/conv.py.
 *
 * Conv (1-D as 2-D with height 1) is a GEMM per image and group: Y[Cout_g, P] =
 * W[Cout_g, K] . col[K, P] with K = Cin_g*kh*kw and P = Ho*Wo, the weights packed
 * at build time as ea_gemm's A panels, the bias, a residual input and the
 * activation in its epilogue. col is the input itself for a 1x1 stride-1
 * unpadded conv (ea_gemm packs its rows); otherwise im2col writes col straight
 * into ea_gemm's B panels, one K x 512 block at a time, from a zero-padded copy
 * of the input (no bounds checks per element). Depthwise convolutions (one input
 * channel per group) run a direct kernel instead: every tap's weight in a
 * register, 4 outputs of a row at a time.
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

/* im2col straight into ea_gemm's B panels: row k = (c*kh + ky)*kw + kx of B is input channel c
   shifted by (ky, kx) and sampled at the output positions, column j = oy*Wo + ox. The input
   comes zero-padded (pad_input), so that every output row reads one strided run. */
typedef struct {
  const float *x; /* the group's first input channel, padded: planes of Hp x Wp */
  int32_t Hp, Wp;
  const int32_t *at;
} im2col_t;

/* The rows and columns of the padded input a conv reads. */
static inline int32_t padded_extent(int32_t out, int32_t stride, int32_t k, int32_t dilation) {
  return (out - 1) * stride + (k - 1) * dilation + 1;
}

/* Channels [0, cin) of x (H x W planes) into Hp x Wp planes with pt rows / pl columns of zeros
   before (and what the extent needs after). */
static void pad_input(const float *x, int32_t cin, const int32_t *at, int32_t Hp, int32_t Wp, float *dst) {
  const int32_t H = at[A_H], W = at[A_W], pt = at[A_PT], pl = at[A_PL];
  for (int32_t c = 0; c < cin; c++) {
    const float *src = x + (size_t)c * H * W;
    float *d = dst + (size_t)c * Hp * Wp;
    for (int32_t r = 0; r < Hp; r++) {
      const int32_t iy = r - pt;
      float *row = d + (size_t)r * Wp;
      if (iy < 0 || iy >= H) {
        for (int32_t i = 0; i < Wp; i++) row[i] = 0.0f;
        continue;
      }
      const float *s = src + (size_t)iy * W;
      const int32_t lo = EA_MIN(pl, Wp), hi = EA_MIN(pl + W, Wp);
      int32_t i = 0;
      for (; i < lo; i++) row[i] = 0.0f;
      for (; i + 4 <= hi; i += 4) wasm_v128_store(row + i, wasm_v128_load(s + i - pl));
      for (; i < hi; i++) row[i] = s[i - pl];
      for (; i < Wp; i++) row[i] = 0.0f;
    }
  }
}

/* One row of B for a column block (at most EA_NC values), zero-padded to whole panels. */
static float im2col_row[EA_NC + EA_NR] __attribute__((aligned(16)));

static void pack_im2col(const void *ctx, int32_t k0, int32_t kc, int32_t j0, int32_t nc, float *dst) {
  const im2col_t *ic = ctx;
  const int32_t *at = ic->at;
  const int32_t Hp = ic->Hp, Wp = ic->Wp, Wo = at[A_WO];
  const int32_t kh = at[A_KH], kw = at[A_KW], sh = at[A_SH], sw = at[A_SW], dh = at[A_DH], dw = at[A_DW];
  const int32_t panels = (nc + EA_NR - 1) / EA_NR;
  const size_t panel_stride = (size_t)kc * EA_NR;
  float *row = im2col_row;
  for (int32_t t = nc; t < panels * EA_NR; t++) row[t] = 0.0f;
  const int32_t oy0 = j0 / Wo, ox0 = j0 % Wo;
  /* Row k0 is (channel c, tap ky, kx); later rows step kx, then ky, then c (no divisions). */
  int32_t c = k0 / (kh * kw), ky = k0 / kw % kh, kx = k0 % kw;
  for (int32_t kk = 0; kk < kc; kk++) {
    /* Gather the row: one strided run of the padded input per output row. */
    const float *base = ic->x + (size_t)c * Hp * Wp + (size_t)ky * dh * Wp + (size_t)kx * dw;
    int32_t j = 0, oy = oy0, ox = ox0;
    while (j < nc) {
      const int32_t n = EA_MIN(Wo - ox, nc - j);
      const float *src = base + (size_t)oy * sh * Wp + (size_t)ox * sw;
      float *r = row + j;
      int32_t i = 0;
      if (sw == 1) {
        for (; i + 4 <= n; i += 4) wasm_v128_store(r + i, wasm_v128_load(src + i));
        for (; i < n; i++) r[i] = src[i];
      } else {
        for (; i < n; i++) r[i] = src[i * sw];
      }
      j += n;
      ox = 0;
      oy++;
    }
    /* Scatter it into the panels. */
    float *d = dst + (size_t)kk * EA_NR;
    for (int32_t p = 0; p < panels; p++, d += panel_stride)
      for (int32_t v = 0; v < EA_NR; v += 4) wasm_v128_store(d + v, wasm_v128_load(row + p * EA_NR + v));
    if (++kx == kw) {
      kx = 0;
      if (++ky == kh) {
        ky = 0;
        c++;
      }
    }
  }
}

/*
 * OP_CONV
 *   in:  X [N, Cin, H, W] (or [N, Cin, W]: H = 1), W packed (per group, ea_gemm's A layout),
 *        bias [Cout] (or absent), residual (Y's shape, added before the activation; or absent)
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
  /* 1x1, stride 1, no padding: B is the input itself, row-major [Cin_g, P]. */
  const int direct = at[A_KH] == 1 && at[A_KW] == 1 && at[A_SH] == 1 && at[A_SW] == 1 && at[A_PT] == 0 &&
                     at[A_PL] == 0 && at[A_HO] == at[A_H] && at[A_WO] == at[A_W];
  ea_gemm_t g = {0};
  g.work = ea_scratch((uint32_t)ea_gemm_work_floats(P) * 4u);
  if (!g.work) return EA_ERR_NOMEM;
  /* The padded input im2col reads (the input itself when no padding is needed). */
  const int32_t Hp = padded_extent(at[A_HO], at[A_SH], at[A_KH], at[A_DH]);
  const int32_t Wp = padded_extent(at[A_WO], at[A_SW], at[A_KW], at[A_DW]);
  const int pad = !direct && (at[A_PT] || at[A_PL] || Hp > at[A_H] || Wp > at[A_W]);
  float *padded = 0;
  if (pad) {
    padded = ea_scratch((uint32_t)cin_g * (uint32_t)Hp * (uint32_t)Wp * 4u);
    if (!padded) return EA_ERR_NOMEM;
  }
  ea_act_read(op, A_ACT_MODE, 0, &g.act);
  g.M = cout_g;
  g.N = P;
  g.K = K;
  g.alpha = 1.0f;
  g.ldc = P;
  g.ld_init = P;
  ea_rows_t rows;
  im2col_t cols;
  rows.ld = P;
  cols.at = at;
  if (direct) {
    g.pack_b = ea_gemm_pack_rows;
    g.b_ctx = &rows;
  } else {
    g.pack_b = pack_im2col;
    g.b_ctx = &cols;
  }
  const int32_t panel_floats = ea_gemm_packed_a_size(cout_g, K);
  for (int32_t n = 0; n < batch; n++) {
    for (int32_t gi = 0; gi < group; gi++) {
      const float *xg = (const float *)x->data + (size_t)n * in_image + (size_t)gi * cin_g * at[A_H] * at[A_W];
      size_t out_off = (size_t)n * out_image + (size_t)gi * cout_g * P;
      rows.data = xg;
      if (pad) {
        pad_input(xg, cin_g, at, Hp, Wp, padded);
        cols.x = padded;
        cols.Hp = Hp;
        cols.Wp = Wp;
      } else {
        cols.x = xg;
        cols.Hp = at[A_H];
        cols.Wp = at[A_W];
      }
      g.a = (const float *)w->data + (size_t)gi * panel_floats;
      g.c = (float *)y->data + out_off;
      g.bias_row = bias ? (const float *)bias->data + (size_t)gi * cout_g : 0;
      g.init = res ? (const float *)res->data + out_off : 0;
      int32_t status = ea_gemm(&g);
      if (status != EA_OK) return status;
    }
  }
  return EA_OK;
}

/* One output plane of a depthwise conv from its zero-padded input plane (row stride Wp, 8 floats
   of slack after it): Y = b + sum over taps of w[t] * shifted input. KH, KW: the kernel size
   when it is a compile-time constant (3 x 3), else 0 (read from at). Vectorised along the row,
   4 outputs at a time, every tap's weight in a register. */
static inline __attribute__((always_inline)) void dw_plane(const int KH, const int KW, const float *pb, int32_t Wp,
                                                            const float *w, float b, const int32_t *at, float *yp) {
  const int32_t Ho = at[A_HO], Wo = at[A_WO], sh = at[A_SH], sw = at[A_SW], dh = at[A_DH], dw = at[A_DW];
  const int32_t kh = KH ? KH : at[A_KH], kw = KW ? KW : at[A_KW];
  v128_t wv[9];
  if (KH)
    for (int t = 0; t < KH * KW; t++) wv[t] = wasm_f32x4_splat(w[t]);
  const v128_t bv = wasm_f32x4_splat(b);
  for (int32_t oy = 0; oy < Ho; oy++) {
    float *o = yp + (size_t)oy * Wo;
    const float *r0 = pb + (size_t)oy * sh * Wp;
    if ((sw == 1 || sw == 2) && Wo >= 4) {
      /* 4 outputs at a time; a last partial block is redone overlapping the one before. */
      for (int32_t ox = 0; ox < Wo; ox += 4) {
        if (ox + 4 > Wo) ox = Wo - 4;
        v128_t acc = bv;
        for (int32_t ky = 0; ky < kh; ky++)
          for (int32_t kx = 0; kx < kw; kx++) {
            const v128_t wt = KH ? wv[ky * KW + kx] : wasm_f32x4_splat(w[ky * kw + kx]);
            const float *s = r0 + (size_t)ky * dh * Wp + (size_t)ox * sw + kx * dw;
            v128_t x;
            if (sw == 1) x = wasm_v128_load(s);
            else x = wasm_i32x4_shuffle(wasm_v128_load(s), wasm_v128_load(s + 4), 0, 2, 4, 6);
            acc = EA_MADD(wt, x, acc);
          }
        wasm_v128_store(o + ox, acc);
      }
      continue;
    }
    for (int32_t ox = 0; ox < Wo; ox++) {
      float acc = b;
      for (int32_t ky = 0; ky < kh; ky++)
        for (int32_t kx = 0; kx < kw; kx++) acc += w[ky * kw + kx] * r0[(size_t)ky * dh * Wp + (size_t)ox * sw + kx * dw];
      o[ox] = acc;
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
  const int32_t Hp = padded_extent(at[A_HO], at[A_SH], at[A_KH], at[A_DH]);
  const int32_t Wp = padded_extent(at[A_WO], at[A_SW], at[A_KW], at[A_DW]);
  float *pb = ea_scratch(((uint32_t)Hp * (uint32_t)Wp + 8u) * 4u);
  if (!pb) return EA_ERR_NOMEM;
  for (int32_t i = 0; i < 8; i++) pb[(size_t)Hp * Wp + i] = 0.0f;
  const int three = at[A_KH] == 3 && at[A_KW] == 3;
  ea_act_t act;
  ea_act_read(op, A_ACT_MODE, 0, &act);
  const float *wv = w->data, *bv = bias ? bias->data : 0;
  for (int32_t n = 0; n < batch; n++) {
    for (int32_t oc = 0; oc < cout; oc++) {
      if (oc % mult == 0)
        pad_input((const float *)x->data + ((size_t)n * cin + oc / mult) * plane_in, 1, at, Hp, Wp, pb);
      size_t out_off = ((size_t)n * cout + oc) * P;
      float *yp = (float *)y->data + out_off;
      const float *wo = wv + (size_t)oc * taps;
      const float b = bv ? bv[oc] : 0.0f;
      if (three) dw_plane(3, 3, pb, Wp, wo, b, at, yp);
      else dw_plane(0, 0, pb, Wp, wo, b, at, yp);
      if (res) {
        const float *r = (const float *)res->data + out_off;
        int32_t i = 0;
        for (; i + 4 <= P; i += 4) wasm_v128_store(yp + i, wasm_f32x4_add(wasm_v128_load(yp + i), wasm_v128_load(r + i)));
        for (; i < P; i++) yp[i] += r[i];
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
