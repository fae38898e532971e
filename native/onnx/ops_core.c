/*
 * ops_core.c: family 0, ops every graph may need: copies, casts, fills.
 * Opcodes: agent/convert/ops/core.py.
 */
#include "ea_math.h"

enum {
  OP_COPY = 0, /* out[0] = in[0], same bytes (graph output that is an alias, Identity to an output) */
  OP_CAST = 1, /* out[0] = (out dtype) in[0] */
  OP_FILL = 2, /* out[0] filled with the one element of in[0] (ConstantOfShape, Expand of a scalar) */
};

static int32_t op_copy(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  if (x->count != y->count || x->dtype != y->dtype) return EA_ERR_INTERNAL;
  if (x->data != y->data) memmove(y->data, x->data, (size_t)x->count * (size_t)ea_dtype_size(x->dtype));
  return EA_OK;
}

static double load_as_double(const ea_tensor_t *t, int32_t i) {
  switch (t->dtype) {
  case EA_F32: return ((const float *)t->data)[i];
  case EA_I32: return ((const int32_t *)t->data)[i];
  case EA_I64: return (double)((const int64_t *)t->data)[i];
  case EA_U8: return ((const uint8_t *)t->data)[i];
  case EA_I8: return ((const int8_t *)t->data)[i];
  case EA_BOOL: return ((const uint8_t *)t->data)[i] != 0;
  default: return 0;
  }
}

static int64_t load_as_i64(const ea_tensor_t *t, int32_t i) {
  switch (t->dtype) {
  case EA_I64: return ((const int64_t *)t->data)[i];
  case EA_I32: return ((const int32_t *)t->data)[i];
  case EA_U8: return ((const uint8_t *)t->data)[i];
  case EA_I8: return ((const int8_t *)t->data)[i];
  case EA_BOOL: return ((const uint8_t *)t->data)[i] != 0;
  default: {
    /* float -> int truncates toward zero as ONNX Cast does; out-of-range is undefined in ONNX, clamp here. */
    double v = load_as_double(t, i);
    if (v != v) return 0;
    if (v >= 9.2233720368547758e18) return INT64_MAX;
    if (v <= -9.2233720368547758e18) return INT64_MIN;
    return (int64_t)v;
  }
  }
}

static int32_t op_cast(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  int32_t n = x->count;
  if (n != y->count) return EA_ERR_INTERNAL;
  switch (y->dtype) {
  case EA_F32: {
    float *o = y->data;
    if (x->dtype == EA_I64) {
      for (int32_t i = 0; i < n; i++) o[i] = (float)((const int64_t *)x->data)[i];
    } else {
      for (int32_t i = 0; i < n; i++) o[i] = (float)load_as_double(x, i);
    }
    return EA_OK;
  }
  case EA_I64: {
    int64_t *o = y->data;
    for (int32_t i = 0; i < n; i++) o[i] = load_as_i64(x, i);
    return EA_OK;
  }
  case EA_I32: {
    int32_t *o = y->data;
    for (int32_t i = 0; i < n; i++) o[i] = (int32_t)load_as_i64(x, i);
    return EA_OK;
  }
  case EA_U8: {
    uint8_t *o = y->data;
    for (int32_t i = 0; i < n; i++) o[i] = (uint8_t)load_as_i64(x, i);
    return EA_OK;
  }
  case EA_I8: {
    int8_t *o = y->data;
    for (int32_t i = 0; i < n; i++) o[i] = (int8_t)load_as_i64(x, i);
    return EA_OK;
  }
  case EA_BOOL: {
    uint8_t *o = y->data;
    for (int32_t i = 0; i < n; i++) o[i] = load_as_double(x, i) != 0;
    return EA_OK;
  }
  default: return EA_ERR_INTERNAL;
  }
}

static int32_t op_fill(const ea_op_t *op) {
  const ea_tensor_t *v = op->in[0];
  ea_tensor_t *y = op->out[0];
  int32_t size = ea_dtype_size(y->dtype);
  if (v->count < 1 || v->dtype != y->dtype) return EA_ERR_INTERNAL;
  unsigned char *o = y->data;
  for (int32_t i = 0; i < y->count; i++) memcpy(o + (size_t)i * size, v->data, (size_t)size);
  return EA_OK;
}

ea_kernel_fn ea_ops_core(uint32_t opcode) {
  switch (opcode & 63u) {
  case OP_COPY: return op_copy;
  case OP_CAST: return op_cast;
  case OP_FILL: return op_fill;
  default: return 0;
  }
}
