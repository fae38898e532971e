/*
 * ea_kernels.h — float32 building blocks for edge-agent model modules.
 *
 * Every kernel takes its dimensions at run time so that hand-written models
 * (native/models/digits.c) and models generated later from ONNX graphs can
 * share them. Tensors are dense, row-major float32; no alignment is required
 * (wasm v128 loads/stores accept any address), and sizes need not be
 * multiples of 4: the tails are handled separately.
 *
 * Built for wasm32 with -msimd128; nothing here calls libc, so a module that
 * uses only these kernels imports nothing.
 */
#ifndef EA_KERNELS_H
#define EA_KERNELS_H

#include <stdint.h>

/* Activation fused into ea_dense_f32, applied after the bias. */
typedef enum {
  EA_ACT_NONE = 0,
  EA_ACT_RELU = 1,
} ea_act_t;

/*
 * Dense layer for a batch: y[r][o] = act(b[o] + sum_i x[r][i] * w[i][o]).
 * x: [rows][in], w: [in][out] (as in `x @ w`), b: [out] or NULL, y: [rows][out].
 * y must not overlap x, w or b.
 */
void ea_dense_f32(const float *x, const float *w, const float *b, float *y, int32_t rows, int32_t in,
                  int32_t out, ea_act_t act);

/* y[i] = max(x[i], 0) for n elements; y may equal x. NaN propagates, as in numpy.maximum. */
void ea_relu_f32(const float *x, float *y, int32_t n);

/*
 * Row-wise softmax of x [rows][cols] into y (y may equal x), numerically
 * stable: exp(x - max(row)) / sum, with the same exp as ea_exp_f32.
 */
void ea_softmax_rows_f32(const float *x, float *y, int32_t rows, int32_t cols);

/* Row-wise argmax of x [rows][cols] into out [rows]; the first maximum wins, as in numpy.argmax. */
void ea_argmax_rows_f32_i64(const float *x, int64_t *out, int32_t rows, int32_t cols);

/*
 * exp(x) of n elements; y may equal x. Cephes-style range reduction and
 * polynomial (within about 2 ulp of the correctly rounded result); exact 0
 * below about -103.3, +inf above about 88.72, NaN propagates, exp(0) == 1.
 */
void ea_exp_f32(const float *x, float *y, int32_t n);

#endif /* EA_KERNELS_H */
