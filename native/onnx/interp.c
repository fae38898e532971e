/*
 * interp.c: Model ABI v2 exports of the ONNX kernel library.
 *
 * The module is the same for every converted model. ea_init reads the plan
 * (parameter 0), lays out the arena and the I/O buffers, and resolves each op
 * to its kernel; ea_run walks the ops in order. See plan.h for the format and
 * docs/MODEL_ABI.md (ABI v2) for the contract with the host.
 */
#include "../include/edge_model.h"
#include "ea_math.h"
#include "plan.h"

#define PAGE 65536u

extern unsigned char __heap_base;
static uintptr_t heap_top = (uintptr_t)&__heap_base;

static int32_t initialised;
static uint32_t max_batch;
static uint32_t n_tensors, n_ops, n_inputs, n_outputs;
static const ea_tdesc_t *tdesc;
static ea_tensor_t *tensors;
static int32_t *tensor_row_count; /* count of a batched tensor per unit of batch */
static ea_op_t *ops;
static const uint32_t *input_ids, *output_ids;
static void **input_bufs, **output_bufs;

static unsigned char *scratch_base;
static uint32_t scratch_cap, scratch_used;

EA_EXPORT(ea_abi_version) int32_t ea_abi_version(void) { return 2; }

/* ABI v2: valid after ea_init (the plan says it); 0 before. */
EA_EXPORT(ea_max_batch) int32_t ea_max_batch(void) { return initialised ? (int32_t)max_batch : 0; }

EA_EXPORT(ea_alloc) void *ea_alloc(uint32_t nbytes) {
  uintptr_t start = (heap_top + 15u) & ~(uintptr_t)15u;
  if (nbytes > 0xFFFFFFF0u - start) return 0;
  uintptr_t end = start + nbytes;
  uintptr_t have = __builtin_wasm_memory_size(0) * PAGE;
  if (end > have) {
    uintptr_t pages = (end - have + PAGE - 1) / PAGE;
    if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) return 0;
  }
  heap_top = end;
  /* Fresh pages are zero; reused memory never happens (nothing is freed). */
  return (void *)start;
}

void *ea_scratch(uint32_t nbytes) {
  nbytes = (nbytes + 15u) & ~15u;
  if (scratch_used + nbytes > scratch_cap) {
    /* Grow by abandoning the old region: it happens a few times per instance at most. */
    uint32_t want = scratch_used + nbytes;
    if (want < 2 * scratch_cap) want = 2 * scratch_cap;
    unsigned char *fresh = ea_alloc(want);
    if (!fresh) return 0;
    scratch_base = fresh;
    scratch_cap = want;
    scratch_used = 0;
  }
  void *p = scratch_base + scratch_used;
  scratch_used += nbytes;
  return p;
}

static ea_kernel_fn lookup(uint32_t opcode) {
  switch (EA_FAMILY(opcode)) {
  case EA_FAM_CORE: return ea_ops_core(opcode);
  case EA_FAM_UNARY: return ea_ops_unary(opcode);
  case EA_FAM_BINARY: return ea_ops_binary(opcode);
  case EA_FAM_LINEAR: return ea_ops_linear(opcode);
  case EA_FAM_CONV: return ea_ops_conv(opcode);
  case EA_FAM_NORM: return ea_ops_norm(opcode);
  case EA_FAM_SHAPE: return ea_ops_shape(opcode);
  case EA_FAM_REDUCE: return ea_ops_reduce(opcode);
  case EA_FAM_QUANT: return ea_ops_quant(opcode);
  case EA_FAM_ML: return ea_ops_ml(opcode);
  default: return 0;
  }
}

/* For tests: 1 when this build has a kernel for the opcode. */
EA_EXPORT(ea_has_op) int32_t ea_has_op(int32_t opcode) { return opcode >= 0 && lookup((uint32_t)opcode) != 0; }

static uint32_t rd32(const unsigned char *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

static int64_t tensor_bytes(const ea_tdesc_t *d, uint32_t batch) {
  int64_t n = 1;
  for (uint32_t i = 0; i < d->rank; i++) {
    int64_t dim = d->dims[i];
    if (i == 0 && d->batched) dim *= batch;
    n *= dim;
  }
  return n * ea_dtype_size(d->dtype);
}

EA_EXPORT(ea_init) int32_t ea_init(const ea_param_t *params, int32_t n_params) {
  if (initialised || n_params < 1) return EA_ERR_PARAMS;
  const unsigned char *plan = (const unsigned char *)(uintptr_t)params[0].ptr;
  uint32_t plan_bytes = params[0].nbytes;
  if (plan_bytes < 32 || ((uintptr_t)plan & 3u) || rd32(plan) != EA_PLAN_MAGIC || rd32(plan + 4) != EA_PLAN_VERSION)
    return EA_ERR_PARAMS;
  max_batch = rd32(plan + 8);
  n_tensors = rd32(plan + 12);
  n_ops = rd32(plan + 16);
  n_inputs = rd32(plan + 20);
  n_outputs = rd32(plan + 24);
  uint32_t arena_bytes = rd32(plan + 28);
  if (max_batch < 1 || n_tensors > (1u << 20) || n_ops > (1u << 20) || n_inputs > n_tensors || n_outputs > n_tensors)
    return EA_ERR_PARAMS;
  uint32_t at = 32;
  if ((uint64_t)n_tensors * sizeof(ea_tdesc_t) + (uint64_t)(n_inputs + n_outputs) * 4 > plan_bytes - at)
    return EA_ERR_PARAMS;
  tdesc = (const ea_tdesc_t *)(plan + at);
  at += n_tensors * (uint32_t)sizeof(ea_tdesc_t);
  input_ids = (const uint32_t *)(plan + at);
  at += n_inputs * 4;
  output_ids = (const uint32_t *)(plan + at);
  at += n_outputs * 4;

  tensors = ea_alloc(n_tensors * (uint32_t)sizeof(ea_tensor_t));
  tensor_row_count = ea_alloc(n_tensors * 4);
  ops = ea_alloc(n_ops * (uint32_t)sizeof(ea_op_t));
  input_bufs = ea_alloc(n_inputs * 4 + 4);
  output_bufs = ea_alloc(n_outputs * 4 + 4);
  unsigned char *arena = ea_alloc(arena_bytes);
  if (!tensors || !tensor_row_count || !ops || !input_bufs || !output_bufs || (arena_bytes && !arena)) return EA_ERR_NOMEM;

  for (uint32_t i = 0; i < n_inputs; i++)
    if (input_ids[i] >= n_tensors || tdesc[input_ids[i]].kind != EA_LOC_INPUT || tdesc[input_ids[i]].loc != i) return EA_ERR_PARAMS;
  for (uint32_t i = 0; i < n_outputs; i++)
    if (output_ids[i] >= n_tensors || tdesc[output_ids[i]].kind != EA_LOC_OUTPUT || tdesc[output_ids[i]].loc != i) return EA_ERR_PARAMS;

  /* Storage: arena offsets, parameters, dedicated I/O buffers; aliases afterwards. */
  for (uint32_t t = 0; t < n_tensors; t++) {
    const ea_tdesc_t *d = &tdesc[t];
    if (d->rank > EA_MAX_RANK || ea_dtype_size(d->dtype) == 0) return EA_ERR_PARAMS;
    int64_t elems = 1;
    for (uint32_t i = 0; i < d->rank; i++) {
      if (d->dims[i] < 0) return EA_ERR_PARAMS;
      elems *= d->dims[i];
      if (elems > 0x7FFFFFFF) return EA_ERR_PARAMS;
    }
    tensor_row_count[t] = (int32_t)elems;
    int64_t nbytes = tensor_bytes(d, max_batch);
    if (nbytes > 0x7FFFFFFF) return EA_ERR_PARAMS;
    ea_tensor_t *rt = &tensors[t];
    rt->dtype = d->dtype;
    rt->rank = d->rank;
    for (uint32_t i = 0; i < d->rank; i++) rt->dims[i] = d->dims[i];
    rt->count = (int32_t)elems;
    switch (d->kind) {
    case EA_LOC_ARENA:
      if ((uint64_t)d->loc + (uint64_t)nbytes > arena_bytes) return EA_ERR_PARAMS;
      rt->data = arena + d->loc;
      break;
    case EA_LOC_PARAM:
      if (d->loc == 0 || d->loc >= (uint32_t)n_params || params[d->loc].nbytes != (uint32_t)nbytes || d->batched) return EA_ERR_PARAMS;
      rt->data = (void *)(uintptr_t)params[d->loc].ptr;
      break;
    case EA_LOC_INPUT:
    case EA_LOC_OUTPUT:
      rt->data = ea_alloc((uint32_t)nbytes ? (uint32_t)nbytes : 16);
      if (!rt->data) return EA_ERR_NOMEM;
      if (d->kind == EA_LOC_INPUT) input_bufs[d->loc] = rt->data;
      else output_bufs[d->loc] = rt->data;
      break;
    case EA_LOC_ALIAS:
      break;
    default:
      return EA_ERR_PARAMS;
    }
  }
  for (uint32_t t = 0; t < n_tensors; t++) {
    const ea_tdesc_t *d = &tdesc[t];
    if (d->kind != EA_LOC_ALIAS) continue;
    if (d->loc >= n_tensors || tdesc[d->loc].kind == EA_LOC_ALIAS) return EA_ERR_PARAMS;
    if (tensor_bytes(d, max_batch) > tensor_bytes(&tdesc[d->loc], max_batch)) return EA_ERR_PARAMS;
    tensors[t].data = tensors[d->loc].data;
  }

  /* Ops: decode and bind each to its kernel. */
  for (uint32_t k = 0; k < n_ops; k++) {
    if (plan_bytes - at < 8) return EA_ERR_PARAMS;
    const unsigned char *p = plan + at;
    ea_op_t *op = &ops[k];
    op->opcode = (uint32_t)p[0] | (uint32_t)p[1] << 8;
    op->n_in = p[2];
    op->n_out = p[3];
    op->n_i = (int32_t)((uint32_t)p[4] | (uint32_t)p[5] << 8);
    op->n_f = (int32_t)((uint32_t)p[6] | (uint32_t)p[7] << 8);
    if (op->n_in > EA_MAX_OP_ARGS || op->n_out > EA_MAX_OP_ARGS) return EA_ERR_PARAMS;
    uint32_t words = (uint32_t)(op->n_in + op->n_out + op->n_i + op->n_f);
    if ((plan_bytes - at - 8) / 4 < words) return EA_ERR_PARAMS;
    const int32_t *w = (const int32_t *)(p + 8);
    for (int32_t i = 0; i < op->n_in; i++) {
      int32_t id = w[i];
      if (id < -1 || id >= (int32_t)n_tensors) return EA_ERR_PARAMS;
      op->in[i] = id < 0 ? 0 : &tensors[id];
    }
    for (int32_t i = 0; i < op->n_out; i++) {
      int32_t id = w[op->n_in + i];
      if (id < 0 || id >= (int32_t)n_tensors || tdesc[id].kind == EA_LOC_PARAM || tdesc[id].kind == EA_LOC_INPUT) return EA_ERR_PARAMS;
      op->out[i] = &tensors[id];
    }
    op->iattr = w + op->n_in + op->n_out;
    op->fattr = (const float *)(op->iattr + op->n_i);
    op->kernel = lookup(op->opcode);
    if (!op->kernel) return EA_ERR_PARAMS;
    at += 8 + words * 4;
  }
  if (at != plan_bytes) return EA_ERR_PARAMS;
  initialised = 1;
  return EA_OK;
}

EA_EXPORT(ea_input) void *ea_input(int32_t index) {
  if (!initialised || index < 0 || (uint32_t)index >= n_inputs) return 0;
  return input_bufs[index];
}

EA_EXPORT(ea_output) void *ea_output(int32_t index) {
  if (!initialised || index < 0 || (uint32_t)index >= n_outputs) return 0;
  return output_bufs[index];
}

EA_EXPORT(ea_run) int32_t ea_run(int32_t batch) {
  if (!initialised) return EA_ERR_STATE;
  if (batch < 1 || (uint32_t)batch > max_batch) return EA_ERR_BATCH;
  for (uint32_t t = 0; t < n_tensors; t++) {
    if (!tdesc[t].batched) continue;
    tensors[t].dims[0] = tdesc[t].dims[0] * batch;
    tensors[t].count = tensor_row_count[t] * batch;
  }
  for (uint32_t k = 0; k < n_ops; k++) {
    scratch_used = 0;
    int32_t status = ops[k].kernel(&ops[k]);
    if (status != EA_OK) return status;
  }
  return EA_OK;
}
