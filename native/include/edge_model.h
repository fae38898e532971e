/*
 * edge_model.h — edge-agent Model ABI, version 1.
 *
 * A model is a wasm32 module that exports its linear memory as "memory" and
 * the functions below. The host (edge-agent) never calls anything else, so any
 * kernel — hand-written or generated from an ONNX graph — that implements
 * these seven functions can be served. See docs/MODEL_ABI.md for the contract.
 *
 * Call order, per instance:
 *   ea_abi_version()                 -> must return EA_ABI_VERSION
 *   ea_max_batch()                   -> rows the I/O buffers hold
 *   ea_alloc(n) * params             -> host copies each parameter tensor in
 *   ea_alloc(8 * count)              -> host writes the ea_param_t table
 *   ea_init(table, count)            -> 0 on success
 *   ea_input(i) / ea_output(i)       -> buffer addresses, stable after ea_init
 *   then, per request: write inputs, ea_run(batch), read outputs.
 */
#ifndef EDGE_MODEL_H
#define EDGE_MODEL_H

#include <stdint.h>

#define EA_ABI_VERSION 1

/* Status codes returned by ea_init and ea_run. */
#define EA_OK 0
#define EA_ERR_BATCH (-1)    /* batch < 1 or > ea_max_batch() */
#define EA_ERR_PARAMS (-2)   /* parameter count or sizes do not match */
#define EA_ERR_NOMEM (-3)    /* memory.grow failed */
#define EA_ERR_INPUT (-4)    /* input values the model refuses */
#define EA_ERR_STATE (-5)    /* ea_run before a successful ea_init */
#define EA_ERR_INTERNAL (-6) /* anything else */

/* One parameter tensor already copied into linear memory by the host. */
typedef struct {
  uint32_t ptr;    /* byte offset in linear memory, 16-byte aligned */
  uint32_t nbytes; /* size in bytes */
} ea_param_t;

#define EA_EXPORT(name) __attribute__((export_name(#name), visibility("default")))

EA_EXPORT(ea_abi_version) int32_t ea_abi_version(void);
EA_EXPORT(ea_max_batch) int32_t ea_max_batch(void);
EA_EXPORT(ea_alloc) void *ea_alloc(uint32_t nbytes);
EA_EXPORT(ea_init) int32_t ea_init(const ea_param_t *params, int32_t count);
EA_EXPORT(ea_input) void *ea_input(int32_t index);
EA_EXPORT(ea_output) void *ea_output(int32_t index);
EA_EXPORT(ea_run) int32_t ea_run(int32_t batch);

#endif /* EDGE_MODEL_H */
