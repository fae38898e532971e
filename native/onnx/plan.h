/*
 * plan.h: the execution plan that the ONNX kernel library (onnx_kernels.wasm)
 * interprets, and the interface between the interpreter and the op kernels.
 *
 * One wasm module serves every converted model: the graph arrives as data
 * (parameter 0, "plan", written by agent/convert/plan.py), so models share
 * the module's compiled code. docs/CONVERTER.md describes the format; this
 * header and agent/convert/plan.py must agree byte for byte
 * (tests/test_convert_plan.py checks them against each other).
 *
 * Plan layout (little-endian, every field 4-byte aligned):
 *   header   u32 magic "EAPL", u32 version, u32 max_batch, u32 n_tensors, u32 n_ops,
 *            u32 n_inputs, u32 n_outputs, u32 arena_bytes
 *   tensors  n_tensors records of ea_tdesc_t (40 bytes each)
 *   inputs   n_inputs  u32 tensor ids (graph inputs, in model.json order)
 *   outputs  n_outputs u32 tensor ids (graph outputs, in model.json order)
 *   ops      n_ops records: u16 opcode, u8 n_in, u8 n_out, u16 n_iattr, u16 n_fattr,
 *            i32 in[n_in] (-1: absent optional input), i32 out[n_out],
 *            i32 iattr[n_iattr], f32 fattr[n_fattr]
 */
#ifndef EA_PLAN_H
#define EA_PLAN_H

#include <stddef.h>
#include <stdint.h>

#define EA_PLAN_MAGIC 0x4C504145u /* "EAPL" */
#define EA_PLAN_VERSION 1u
#define EA_MAX_RANK 8
#define EA_MAX_OP_ARGS 16

/* Element types: ONNX TensorProto.DataType codes. */
enum {
  EA_F32 = 1,
  EA_U8 = 2,
  EA_I8 = 3,
  EA_I32 = 6,
  EA_I64 = 7,
  EA_BOOL = 9,
};

/* Where a tensor's bytes live. */
enum {
  EA_LOC_ARENA = 0,  /* loc = byte offset in the shared arena (sized for max_batch) */
  EA_LOC_PARAM = 1,  /* loc = index in the ea_init parameter table (0 is the plan) */
  EA_LOC_INPUT = 2,  /* loc = graph input index: its own buffer, max_batch rows */
  EA_LOC_OUTPUT = 3, /* loc = graph output index: its own buffer, max_batch rows */
  EA_LOC_ALIAS = 4,  /* loc = id of the tensor whose bytes it shares (a reshape) */
};

/* A tensor as the plan describes it. */
typedef struct {
  uint8_t dtype;
  uint8_t kind;
  uint8_t rank;
  uint8_t batched; /* 1: dims[0] is per unit of batch; at run time dims[0] * batch */
  uint32_t loc;
  int32_t dims[EA_MAX_RANK];
} ea_tdesc_t;

/* A tensor at run time: dims are concrete for the current batch. */
typedef struct {
  void *data;
  int32_t dtype;
  int32_t rank;
  int32_t dims[EA_MAX_RANK];
  int32_t count; /* product of dims (1 for a scalar) */
} ea_tensor_t;

/* One op as a kernel sees it. Absent optional inputs are NULL. */
typedef struct ea_op ea_op_t;
typedef int32_t (*ea_kernel_fn)(const ea_op_t *op);
struct ea_op {
  uint32_t opcode;
  int32_t n_in, n_out, n_i, n_f;
  ea_tensor_t *in[EA_MAX_OP_ARGS];
  ea_tensor_t *out[EA_MAX_OP_ARGS];
  const int32_t *iattr;
  const float *fattr;
  ea_kernel_fn kernel;
};

/* Kernel status codes (the ABI's, docs/MODEL_ABI.md). */
#define EA_OK 0
#define EA_ERR_BATCH (-1)
#define EA_ERR_PARAMS (-2)
#define EA_ERR_NOMEM (-3)
#define EA_ERR_INPUT (-4)
#define EA_ERR_STATE (-5)
#define EA_ERR_INTERNAL (-6)

/*
 * Op families: opcode = family * 64 + index. Each family lives in its own
 * ops_<family>.c and resolves its own opcodes (NULL: unknown). The Python
 * side (agent/convert/ops/<family>.py) declares the same numbers.
 */
#define EA_FAMILY(opcode) ((opcode) >> 6)
enum {
  EA_FAM_CORE = 0,     /* ops_core.c: copy, cast, fill */
  EA_FAM_UNARY = 1,    /* ops_unary.c: elementwise one-input ops and activations */
  EA_FAM_BINARY = 2,   /* ops_binary.c: broadcasting two/many-input ops, comparisons, Where */
  EA_FAM_LINEAR = 3,   /* ops_linear.c: Gemm, MatMul */
  EA_FAM_CONV = 4,     /* ops_conv.c: Conv, ConvTranspose, pooling */
  EA_FAM_NORM = 5,     /* ops_norm.c: normalisations, LRN */
  EA_FAM_SHAPE = 6,    /* ops_shape.c: data movement (Transpose, Concat, Slice, Gather, Pad, Resize, ...) */
  EA_FAM_REDUCE = 7,   /* ops_reduce.c: reductions, Softmax, ArgMax, TopK */
  EA_FAM_QUANT = 8,    /* ops_quant.c: int8 quantized ops */
  EA_FAM_ML = 9,       /* ops_ml.c: ai.onnx.ml (trees, linear classifiers, scaler) */
};
ea_kernel_fn ea_ops_core(uint32_t opcode);
ea_kernel_fn ea_ops_unary(uint32_t opcode);
ea_kernel_fn ea_ops_binary(uint32_t opcode);
ea_kernel_fn ea_ops_linear(uint32_t opcode);
ea_kernel_fn ea_ops_conv(uint32_t opcode);
ea_kernel_fn ea_ops_pool(uint32_t opcode); /* conv family opcodes 32..63 (ops_pool.c) */
ea_kernel_fn ea_ops_norm(uint32_t opcode);
ea_kernel_fn ea_ops_shape(uint32_t opcode);
ea_kernel_fn ea_ops_reduce(uint32_t opcode);
ea_kernel_fn ea_ops_quant(uint32_t opcode);
ea_kernel_fn ea_ops_ml(uint32_t opcode);

/* Bytes per element of a dtype (0: unknown). */
static inline int32_t ea_dtype_size(int32_t dtype) {
  switch (dtype) {
  case EA_F32: return 4;
  case EA_I32: return 4;
  case EA_I64: return 8;
  case EA_U8: case EA_I8: case EA_BOOL: return 1;
  default: return 0;
  }
}

#endif /* EA_PLAN_H */
