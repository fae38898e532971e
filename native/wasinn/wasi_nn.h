/*
 * wasi_nn.h — the wasi_ephemeral_nn (WASI-NN preview1, witx) ABI for C guests.
 *
 * Numbers and layouts as the spec's witx (wasi-nn.witx: tensor_type f16 f32 f64
 * u8 i32 i64; graph_encoding openvino onnx tensorflow pytorch tensorflowlite
 * autodetect; nn_errno success .. not_found) and WasmEdge's wasinntypes.h, whose
 * additions (the ggml encoding, the auto target, errors 100-103) its example
 * apps use. The agent's host side is agent/wasinn/abi.py: keep the two equal.
 *
 * At the wasm level every parameter is an i32 and every function returns its
 * errno as an i32; results go through the pointers passed last.
 */
#ifndef WASI_NN_H
#define WASI_NN_H

#include <stddef.h>
#include <stdint.h>

/* nn_errno */
#define WASI_NN_SUCCESS 0
#define WASI_NN_INVALID_ARGUMENT 1
#define WASI_NN_INVALID_ENCODING 2
#define WASI_NN_MISSING_MEMORY 3
#define WASI_NN_BUSY 4
#define WASI_NN_RUNTIME_ERROR 5
#define WASI_NN_UNSUPPORTED_OPERATION 6
#define WASI_NN_TOO_LARGE 7
#define WASI_NN_NOT_FOUND 8
/* WasmEdge's backend errors */
#define WASI_NN_END_OF_SEQUENCE 100
#define WASI_NN_CONTEXT_FULL 101
#define WASI_NN_PROMPT_TOO_LONG 102
#define WASI_NN_MODEL_NOT_FOUND 103

/* graph_encoding */
#define WASI_NN_ENCODING_OPENVINO 0
#define WASI_NN_ENCODING_ONNX 1
#define WASI_NN_ENCODING_TENSORFLOW 2
#define WASI_NN_ENCODING_PYTORCH 3
#define WASI_NN_ENCODING_TENSORFLOWLITE 4
#define WASI_NN_ENCODING_AUTODETECT 5
#define WASI_NN_ENCODING_GGML 6 /* WasmEdge */

/* execution_target */
#define WASI_NN_TARGET_CPU 0
#define WASI_NN_TARGET_GPU 1
#define WASI_NN_TARGET_TPU 2
#define WASI_NN_TARGET_AUTO 3 /* WasmEdge */

/* tensor_type */
#define WASI_NN_TYPE_F16 0
#define WASI_NN_TYPE_F32 1
#define WASI_NN_TYPE_F64 2
#define WASI_NN_TYPE_U8 3
#define WASI_NN_TYPE_I32 4
#define WASI_NN_TYPE_I64 5

typedef int32_t wasi_nn_errno_t;
typedef uint32_t wasi_nn_graph_t;
typedef uint32_t wasi_nn_context_t;

/* graph_builder: list<u8> */
typedef struct {
  const uint8_t *buf;
  uint32_t len;
} wasi_nn_graph_builder_t;

/* tensor: { dimensions: list<u32>, type: tensor_type (u8, 3 bytes padding), data: list<u8> } */
typedef struct {
  const uint32_t *dims;
  uint32_t rank;
  uint8_t type;
  uint8_t pad[3]; /* keep zero: WasmEdge reads type as a u32 (the witx reads a u8) */
  const uint8_t *data;
  uint32_t data_len;
} wasi_nn_tensor_t;

#if defined(__wasm32__)
/* The layout the host reads (abi.TENSOR_STRUCT "<IIBxxxII", abi.BUILDER_STRUCT "<II"). */
_Static_assert(sizeof(wasi_nn_tensor_t) == 20, "tensor is 20 bytes");
_Static_assert(offsetof(wasi_nn_tensor_t, rank) == 4, "tensor.rank at 4");
_Static_assert(offsetof(wasi_nn_tensor_t, type) == 8, "tensor.type at 8");
_Static_assert(offsetof(wasi_nn_tensor_t, data) == 12, "tensor.data at 12");
_Static_assert(offsetof(wasi_nn_tensor_t, data_len) == 16, "tensor.data_len at 16");
_Static_assert(sizeof(wasi_nn_graph_builder_t) == 8, "graph builder is 8 bytes");
#endif

#define WASI_NN_IMPORT(name) __attribute__((import_module("wasi_ephemeral_nn"), import_name(#name)))

WASI_NN_IMPORT(load)
wasi_nn_errno_t wasi_nn_load(const wasi_nn_graph_builder_t *builders, uint32_t count, uint32_t encoding,
                             uint32_t target, wasi_nn_graph_t *graph);

WASI_NN_IMPORT(load_by_name)
wasi_nn_errno_t wasi_nn_load_by_name(const char *name, uint32_t name_len, wasi_nn_graph_t *graph);

/* WasmEdge: config is a JSON object (the ggml backend's options). */
WASI_NN_IMPORT(load_by_name_with_config)
wasi_nn_errno_t wasi_nn_load_by_name_with_config(const char *name, uint32_t name_len, const char *config,
                                                 uint32_t config_len, wasi_nn_graph_t *graph);

WASI_NN_IMPORT(init_execution_context)
wasi_nn_errno_t wasi_nn_init_execution_context(wasi_nn_graph_t graph, wasi_nn_context_t *context);

WASI_NN_IMPORT(set_input)
wasi_nn_errno_t wasi_nn_set_input(wasi_nn_context_t context, uint32_t index, const wasi_nn_tensor_t *tensor);

WASI_NN_IMPORT(compute)
wasi_nn_errno_t wasi_nn_compute(wasi_nn_context_t context);

WASI_NN_IMPORT(get_output)
wasi_nn_errno_t wasi_nn_get_output(wasi_nn_context_t context, uint32_t index, uint8_t *out, uint32_t out_max,
                                   uint32_t *bytes_written);

/* WasmEdge's streaming calls (the ggml backend). */
WASI_NN_IMPORT(compute_single)
wasi_nn_errno_t wasi_nn_compute_single(wasi_nn_context_t context);

WASI_NN_IMPORT(get_output_single)
wasi_nn_errno_t wasi_nn_get_output_single(wasi_nn_context_t context, uint32_t index, uint8_t *out,
                                          uint32_t out_max, uint32_t *bytes_written);

WASI_NN_IMPORT(fini_single)
wasi_nn_errno_t wasi_nn_fini_single(wasi_nn_context_t context);

WASI_NN_IMPORT(unload)
wasi_nn_errno_t wasi_nn_unload(wasi_nn_graph_t graph);

WASI_NN_IMPORT(finalize_execution_context)
wasi_nn_errno_t wasi_nn_finalize_execution_context(wasi_nn_context_t context);

#endif /* WASI_NN_H */
