/*
 * digits.c — reference model for edge-agent Model ABI v1 (docs/MODEL_ABI.md).
 *
 * An MLP trained on scikit-learn's 8x8 digits (native/models/train_digits.py):
 *   pixels FP32 [-1, 64] (raw 0..16; the /16 scaling is folded into fc1)
 *   -> fc1 64x64 + ReLU -> fc2 64x10 -> probabilities = softmax, label = argmax
 * Outputs: probabilities FP32 [-1, 10], label INT64 [-1].
 *
 * The module imports nothing: no libc calls, memory comes from a bump
 * allocator over memory.grow, and every buffer is carved out in ea_init.
 */
#include <stddef.h>
#include <stdint.h>

#include "../include/edge_model.h"
#include "../kernels/ea_kernels.h"

#define MAX_BATCH 64
#define N_IN 64
#define N_HIDDEN 64
#define N_OUT 10
#define N_PARAMS 4
#define WASM_PAGE 65536u

/* Provided by wasm-ld: the first byte after static data and the stack. */
extern unsigned char __heap_base;

static uint32_t heap_next; /* 0 until the first ea_alloc */

/* Parameter tensors, in model.json order. */
static const float *fc1_w, *fc1_b, *fc2_w, *fc2_b;

/* I/O and scratch buffers, sized for MAX_BATCH rows. */
static float *in_pixels, *out_probs, *hidden;
static int64_t *out_label;
static int ready;

int32_t ea_abi_version(void) { return EA_ABI_VERSION; }

int32_t ea_max_batch(void) { return MAX_BATCH; }

void *ea_alloc(uint32_t nbytes) {
  if (heap_next == 0) heap_next = ((uint32_t)(uintptr_t)&__heap_base + 15u) & ~15u;
  const uint32_t start = heap_next;
  /* Distinct offsets even for empty requests, so no two allocations alias. */
  if (nbytes == 0) nbytes = 1;
  /* Reject sizes whose rounded end would wrap the 32-bit address space. */
  if (nbytes > UINT32_MAX - 15u - start) return NULL;
  const uint32_t end = start + nbytes;
  /* 64-bit: a full 4 GiB memory is 2^32 bytes. */
  const uint64_t have = (uint64_t)__builtin_wasm_memory_size(0) * WASM_PAGE;
  if (end > have) {
    const uint32_t pages = (uint32_t)((end - have + WASM_PAGE - 1) / WASM_PAGE);
    if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) return NULL;
  }
  heap_next = (end + 15u) & ~15u;
  return (void *)(uintptr_t)start;
}

static const uint32_t param_bytes[N_PARAMS] = {
    N_IN * N_HIDDEN * sizeof(float),  /* fc1.weight [64, 64] */
    N_HIDDEN * sizeof(float),         /* fc1.bias   [64]     */
    N_HIDDEN * N_OUT * sizeof(float), /* fc2.weight [64, 10] */
    N_OUT * sizeof(float),            /* fc2.bias   [10]     */
};

/* True when [ptr, ptr + nbytes) lies inside linear memory. */
static int in_memory(uint32_t ptr, uint32_t nbytes) {
  const uint64_t have = (uint64_t)__builtin_wasm_memory_size(0) * WASM_PAGE;
  return (uint64_t)ptr + nbytes <= have;
}

int32_t ea_init(const ea_param_t *params, int32_t count) {
  /* A refused table leaves the instance uninitialised rather than running
   * on the previous parameters. */
  ready = 0;
  if (count != N_PARAMS) return EA_ERR_PARAMS;
  /* Check the table itself before reading it, so a bad pointer is a status,
   * not a trap. */
  const uint32_t table = (uint32_t)(uintptr_t)params;
  if (table == 0 || !in_memory(table, (uint32_t)count * sizeof(ea_param_t))) return EA_ERR_PARAMS;
  for (int32_t i = 0; i < N_PARAMS; i++) {
    const uint32_t ptr = params[i].ptr, nbytes = params[i].nbytes;
    /* The kernels need no alignment, but the ABI promises 16 and anything
     * else means the host wrote the table wrongly. */
    if (nbytes != param_bytes[i] || ptr == 0 || (ptr & 15u) != 0 || !in_memory(ptr, nbytes)) {
      return EA_ERR_PARAMS;
    }
  }
  /* The buffers are allocated once, so ea_input/ea_output stay stable even
   * if a host calls ea_init again (for example after a refused table). */
  if (in_pixels == NULL) {
    float *pixels = ea_alloc(MAX_BATCH * N_IN * sizeof(float));
    float *probs = ea_alloc(MAX_BATCH * N_OUT * sizeof(float));
    int64_t *label = ea_alloc(MAX_BATCH * sizeof(int64_t));
    float *h = ea_alloc(MAX_BATCH * N_HIDDEN * sizeof(float));
    if (pixels == NULL || probs == NULL || label == NULL || h == NULL) return EA_ERR_NOMEM;
    in_pixels = pixels;
    out_probs = probs;
    out_label = label;
    hidden = h;
  }
  fc1_w = (const float *)(uintptr_t)params[0].ptr;
  fc1_b = (const float *)(uintptr_t)params[1].ptr;
  fc2_w = (const float *)(uintptr_t)params[2].ptr;
  fc2_b = (const float *)(uintptr_t)params[3].ptr;
  ready = 1;
  return EA_OK;
}

void *ea_input(int32_t index) { return index == 0 ? (void *)in_pixels : NULL; }

void *ea_output(int32_t index) {
  if (index == 0) return out_probs;
  if (index == 1) return out_label;
  return NULL;
}

int32_t ea_run(int32_t batch) {
  if (!ready) return EA_ERR_STATE;
  if (batch < 1 || batch > MAX_BATCH) return EA_ERR_BATCH;
  ea_dense_f32(in_pixels, fc1_w, fc1_b, hidden, batch, N_IN, N_HIDDEN, EA_ACT_RELU);
  /* The logits go straight into the probabilities buffer: argmax reads them
   * first, then softmax rewrites them in place. */
  ea_dense_f32(hidden, fc2_w, fc2_b, out_probs, batch, N_HIDDEN, N_OUT, EA_ACT_NONE);
  ea_argmax_rows_f32_i64(out_probs, out_label, batch, N_OUT);
  ea_softmax_rows_f32(out_probs, out_probs, batch, N_OUT);
  return EA_OK;
}
