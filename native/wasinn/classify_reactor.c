/*
 * classify_reactor — a WASI-NN app behind the Model ABI v1 (docs/MODEL_ABI.md).
 *
 * No _start: the host instantiates it and calls the ea_* exports. It has no
 * parameters (model.json's params is empty; the model is the version's WASI-NN
 * named model, model.json's wasi_nn.name, here always MODEL_NAME):
 *
 *   ea_init(table, 0)  load_by_name(MODEL_NAME), init_execution_context, the I/O buffers;
 *   ea_run(batch)      set_input(0, f32 [batch, INPUT_SHAPE] from the input buffer),
 *                      compute, get_output(0) into the output buffer, which must then hold
 *                      exactly batch * OUTPUT_ELEMS f32.
 *
 * One build per shape (native/Makefile, native/wasinn/README.md):
 *   -DINPUT_SHAPE=3,224,224   a row of input 0 (the dimensions after the batch one)
 *   -DOUTPUT_ELEMS=1000       f32 elements of a row of output 0
 *   -DMAX_BATCH=1             rows the buffers hold (model.json max_batch)
 *
 * Status codes (edge_model.h): -1 batch out of range, -2 a parameter table that
 * is not empty, -3 out of memory, -4 set_input refused, -5 ea_run before ea_init,
 * -6 a failed load_by_name, init_execution_context, compute or get_output, or an
 * output of another size. wasi_nn_errno() then returns the failed call's errno.
 *
 * Freestanding (no libc, no WASI import): it imports only wasi_ephemeral_nn.
 */
#include "../include/edge_model.h"
#include "wasi_nn.h"

#ifndef MODEL_NAME
#define MODEL_NAME "default"
#endif
#if !defined(INPUT_SHAPE) || !defined(OUTPUT_ELEMS) || !defined(MAX_BATCH)
#error "build with -DINPUT_SHAPE=... -DOUTPUT_ELEMS=... -DMAX_BATCH=..."
#endif

#define WASM_PAGE 65536u

extern unsigned char __heap_base;
static uint32_t heap_next; /* 0 until the first ea_alloc */

static const uint32_t row_shape[] = {INPUT_SHAPE};
#define RANK (1u + sizeof(row_shape) / sizeof(row_shape[0]))
_Static_assert(RANK <= 8, "rank above the host's bound (abi.MAX_RANK)");

static uint32_t input_elems(void) {
  uint32_t n = 1;
  for (uint32_t i = 0; i < RANK - 1; i++)
    n *= row_shape[i];
  return n;
}

static float *in_buf, *out_buf;
static wasi_nn_graph_t graph;
static wasi_nn_context_t ctx;
static int ready;
static wasi_nn_errno_t last_errno;

/* The errno of the wasi-nn call that made ea_init or ea_run fail (0: none failed). */
__attribute__((export_name("wasi_nn_errno"))) int32_t wasi_nn_errno(void) { return last_errno; }

int32_t ea_abi_version(void) { return EA_ABI_VERSION; }

int32_t ea_max_batch(void) { return MAX_BATCH; }

void *ea_alloc(uint32_t nbytes) {
  if (heap_next == 0)
    heap_next = ((uint32_t)(uintptr_t)&__heap_base + 15u) & ~15u;
  const uint32_t start = heap_next;
  if (nbytes == 0)
    nbytes = 1;
  if (nbytes > UINT32_MAX - 15u - start)
    return (void *)0;
  const uint32_t end = start + nbytes;
  const uint64_t have = (uint64_t)__builtin_wasm_memory_size(0) * WASM_PAGE;
  if (end > have) {
    const uint32_t pages = (uint32_t)((end - have + WASM_PAGE - 1) / WASM_PAGE);
    if (__builtin_wasm_memory_grow(0, pages) == (__SIZE_TYPE__)-1)
      return (void *)0;
  }
  heap_next = (end + 15u) & ~15u;
  return (void *)(uintptr_t)start;
}

static int failed(wasi_nn_errno_t err, int32_t status) {
  last_errno = err;
  return status;
}

int32_t ea_init(const ea_param_t *params, int32_t count) {
  (void)params;
  if (count != 0)
    return EA_ERR_PARAMS;
  if (ready)
    return EA_OK;
  static const char name[] = MODEL_NAME;
  wasi_nn_errno_t err = wasi_nn_load_by_name(name, sizeof name - 1, &graph);
  if (err != WASI_NN_SUCCESS)
    return failed(err, EA_ERR_INTERNAL);
  err = wasi_nn_init_execution_context(graph, &ctx);
  if (err != WASI_NN_SUCCESS)
    return failed(err, EA_ERR_INTERNAL);
  in_buf = ea_alloc(MAX_BATCH * input_elems() * sizeof(float));
  out_buf = ea_alloc(MAX_BATCH * OUTPUT_ELEMS * sizeof(float));
  if (in_buf == 0 || out_buf == 0)
    return EA_ERR_NOMEM;
  ready = 1;
  return EA_OK;
}

void *ea_input(int32_t index) { return index == 0 ? in_buf : (void *)0; }

void *ea_output(int32_t index) { return index == 0 ? out_buf : (void *)0; }

int32_t ea_run(int32_t batch) {
  if (!ready)
    return EA_ERR_STATE;
  if (batch < 1 || batch > MAX_BATCH)
    return EA_ERR_BATCH;
  uint32_t dims[RANK];
  dims[0] = (uint32_t)batch;
  for (uint32_t i = 1; i < RANK; i++)
    dims[i] = row_shape[i - 1];
  wasi_nn_tensor_t tensor;
  tensor.dims = dims;
  tensor.rank = RANK;
  tensor.type = WASI_NN_TYPE_F32;
  tensor.pad[0] = tensor.pad[1] = tensor.pad[2] = 0;
  tensor.data = (const uint8_t *)in_buf;
  tensor.data_len = (uint32_t)batch * input_elems() * sizeof(float);
  wasi_nn_errno_t err = wasi_nn_set_input(ctx, 0, &tensor);
  if (err != WASI_NN_SUCCESS)
    return failed(err, EA_ERR_INPUT);
  err = wasi_nn_compute(ctx);
  if (err != WASI_NN_SUCCESS)
    return failed(err, EA_ERR_INTERNAL);
  const uint32_t want = (uint32_t)batch * OUTPUT_ELEMS * sizeof(float);
  uint32_t written = 0;
  /* The whole buffer as the bound: a model that answers more rows than asked is caught below. */
  err = wasi_nn_get_output(ctx, 0, (uint8_t *)out_buf, MAX_BATCH * OUTPUT_ELEMS * sizeof(float), &written);
  if (err != WASI_NN_SUCCESS)
    return failed(err, EA_ERR_INTERNAL);
  if (written != want)
    return failed(WASI_NN_SUCCESS, EA_ERR_INTERNAL);
  last_errno = WASI_NN_SUCCESS;
  return EA_OK;
}
