/*
 * hostile — a WASI-NN command app that makes one hostile call, then classifies.
 *
 *   hostile CASE [N]
 *
 * Runs against a host with a named model "default" of input 0 f32 [batch, 4]
 * (any f32 output). Makes the call CASE names (see the table at the end),
 * prints "errno E" with the errno the host returned, then classifies a fixed
 * row {0.5, -1.25, 2, 0.75} through the same host (load_by_name "default",
 * a new context) and prints output 0's floats, one per line (%.9g): a host
 * that keeps serving after the hostile call.
 *
 * Exit status: 0; 1 usage; 2 the classification after the call failed
 * ("serve CALL: errno E" on stdout).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wasi_nn.h"

/* Addresses past any memory this app has (it never grows near 4 GiB). */
#define FAR 0xFFFFFF00u
#define FAR_PTR(type) ((type)(uintptr_t)FAR)

static const char model[] = "default";
static const float row[4] = {0.5f, -1.25f, 2.0f, 0.75f};
static uint32_t row_dims[2] = {1, 4};
static float out[4096];
static uint32_t arg_n;

static void serve_check(const char *call, wasi_nn_errno_t err) {
  if (err != WASI_NN_SUCCESS) {
    printf("serve %s: errno %d\n", call, (int)err);
    exit(2);
  }
}

static wasi_nn_graph_t graph(void) {
  wasi_nn_graph_t g = 0;
  serve_check("load_by_name", wasi_nn_load_by_name(model, sizeof model - 1, &g));
  return g;
}

static wasi_nn_context_t context(void) {
  wasi_nn_context_t c = 0;
  serve_check("init_execution_context", wasi_nn_init_execution_context(graph(), &c));
  return c;
}

static wasi_nn_tensor_t good_tensor(void) {
  wasi_nn_tensor_t t;
  memset(&t, 0, sizeof t);
  t.dims = row_dims;
  t.rank = 2;
  t.type = WASI_NN_TYPE_F32;
  t.data = (const uint8_t *)row;
  t.data_len = sizeof row;
  return t;
}

/* A context with the good row set and computed. */
static wasi_nn_context_t computed(void) {
  wasi_nn_context_t c = context();
  wasi_nn_tensor_t t = good_tensor();
  serve_check("set_input", wasi_nn_set_input(c, 0, &t));
  serve_check("compute", wasi_nn_compute(c));
  return c;
}

static wasi_nn_errno_t set_input_with(wasi_nn_tensor_t t) { return wasi_nn_set_input(context(), 0, &t); }

/* -- the cases ------------------------------------------------------------ */

static wasi_nn_errno_t bad_graph(void) {
  wasi_nn_context_t c;
  graph();
  return wasi_nn_init_execution_context(0xDEAD, &c);
}

static wasi_nn_errno_t bad_context(void) {
  wasi_nn_tensor_t t = good_tensor();
  context();
  return wasi_nn_set_input(0xBEEF, 0, &t);
}

static wasi_nn_errno_t bad_context_compute(void) {
  computed();
  return wasi_nn_compute(0xBEEF);
}

static wasi_nn_errno_t bad_context_output(void) {
  uint32_t w;
  computed();
  return wasi_nn_get_output(0xBEEF, 0, (uint8_t *)out, sizeof out, &w);
}

static wasi_nn_errno_t foreign_graph(void) {
  wasi_nn_context_t c;
  return wasi_nn_init_execution_context(arg_n, &c);
}

static wasi_nn_errno_t foreign_context(void) { return wasi_nn_compute(arg_n); }

static wasi_nn_errno_t oob_tensor(void) { return wasi_nn_set_input(context(), 0, FAR_PTR(const wasi_nn_tensor_t *)); }

static wasi_nn_errno_t oob_dims(void) {
  wasi_nn_tensor_t t = good_tensor();
  t.dims = FAR_PTR(const uint32_t *);
  return set_input_with(t);
}

static wasi_nn_errno_t oob_data(void) {
  wasi_nn_tensor_t t = good_tensor();
  t.data = FAR_PTR(const uint8_t *);
  return set_input_with(t);
}

static wasi_nn_errno_t size_mismatch(void) {
  wasi_nn_tensor_t t = good_tensor();
  t.data_len = 12; /* [1, 4] f32 is 16 */
  return set_input_with(t);
}

static wasi_nn_errno_t unknown_type(void) {
  wasi_nn_tensor_t t = good_tensor();
  t.type = 17;
  return set_input_with(t);
}

static wasi_nn_errno_t wrong_type(void) {
  wasi_nn_tensor_t t = good_tensor();
  t.type = WASI_NN_TYPE_I32; /* same size, but the model wants f32 */
  return set_input_with(t);
}

static wasi_nn_errno_t bad_input_index(void) {
  wasi_nn_tensor_t t = good_tensor();
  return wasi_nn_set_input(context(), 7, &t);
}

static wasi_nn_errno_t rank_too_large(void) {
  static uint32_t ones[9] = {1, 1, 1, 1, 1, 1, 1, 1, 4};
  wasi_nn_tensor_t t = good_tensor();
  t.dims = ones;
  t.rank = 9;
  return set_input_with(t);
}

static wasi_nn_errno_t huge_rank(void) {
  wasi_nn_tensor_t t = good_tensor();
  t.rank = 0x40000000u;
  return set_input_with(t);
}

static wasi_nn_errno_t huge_dims(void) {
  static uint32_t dims[3] = {65536, 65536, 4};
  wasi_nn_tensor_t t = good_tensor();
  t.dims = dims;
  t.rank = 3;
  return set_input_with(t);
}

static wasi_nn_errno_t wrong_shape(void) {
  static const float five[5] = {1, 2, 3, 4, 5};
  static uint32_t dims[2] = {1, 5};
  wasi_nn_context_t c = context();
  wasi_nn_tensor_t t = good_tensor();
  t.dims = dims;
  t.data = (const uint8_t *)five;
  t.data_len = sizeof five;
  serve_check("set_input", wasi_nn_set_input(c, 0, &t)); /* accepted: the backend checks shapes at compute */
  return wasi_nn_compute(c);
}

static wasi_nn_errno_t compute_before_input(void) { return wasi_nn_compute(context()); }

static wasi_nn_errno_t output_before_compute(void) {
  uint32_t w;
  wasi_nn_context_t c = context();
  wasi_nn_tensor_t t = good_tensor();
  serve_check("set_input", wasi_nn_set_input(c, 0, &t));
  return wasi_nn_get_output(c, 0, (uint8_t *)out, sizeof out, &w);
}

static wasi_nn_errno_t oob_output(void) {
  uint32_t w;
  return wasi_nn_get_output(computed(), 0, FAR_PTR(uint8_t *), 1024, &w);
}

static wasi_nn_errno_t oob_written(void) {
  return wasi_nn_get_output(computed(), 0, (uint8_t *)out, sizeof out, FAR_PTR(uint32_t *));
}

static wasi_nn_errno_t small_output(void) {
  uint32_t w;
  return wasi_nn_get_output(computed(), 0, (uint8_t *)out, 4, &w);
}

static wasi_nn_errno_t bad_output_index(void) {
  uint32_t w;
  return wasi_nn_get_output(computed(), 5, (uint8_t *)out, sizeof out, &w);
}

static const uint8_t junk[64] = "not an onnx model, not any model at all";

static wasi_nn_errno_t load_with(const wasi_nn_graph_builder_t *b, uint32_t count, uint32_t enc, uint32_t target) {
  wasi_nn_graph_t g;
  return wasi_nn_load(b, count, enc, target, &g);
}

static wasi_nn_errno_t unknown_encoding(void) {
  wasi_nn_graph_builder_t b = {junk, sizeof junk};
  return load_with(&b, 1, 99, WASI_NN_TARGET_CPU);
}

static wasi_nn_errno_t unknown_target(void) {
  wasi_nn_graph_builder_t b = {junk, sizeof junk};
  return load_with(&b, 1, WASI_NN_ENCODING_ONNX, 9);
}

static wasi_nn_errno_t garbage_model(void) {
  wasi_nn_graph_builder_t b = {junk, sizeof junk};
  return load_with(&b, 1, WASI_NN_ENCODING_ONNX, WASI_NN_TARGET_CPU);
}

static wasi_nn_errno_t huge_builder(void) {
  wasi_nn_graph_builder_t b = {junk, 0xFFFFFF00u};
  return load_with(&b, 1, WASI_NN_ENCODING_ONNX, WASI_NN_TARGET_CPU);
}

static wasi_nn_errno_t oob_builder(void) {
  wasi_nn_graph_builder_t b = {FAR_PTR(const uint8_t *), 128};
  return load_with(&b, 1, WASI_NN_ENCODING_ONNX, WASI_NN_TARGET_CPU);
}

static wasi_nn_errno_t oob_builder_array(void) {
  return load_with(FAR_PTR(const wasi_nn_graph_builder_t *), 1, WASI_NN_ENCODING_ONNX, WASI_NN_TARGET_CPU);
}

static wasi_nn_errno_t many_builders(void) {
  wasi_nn_graph_builder_t b = {junk, sizeof junk};
  return load_with(&b, 100000, WASI_NN_ENCODING_ONNX, WASI_NN_TARGET_CPU);
}

static wasi_nn_errno_t no_builders(void) {
  wasi_nn_graph_builder_t b = {junk, sizeof junk};
  return load_with(&b, 0, WASI_NN_ENCODING_ONNX, WASI_NN_TARGET_CPU);
}

static wasi_nn_errno_t unknown_model(void) {
  static const char name[] = "no-such-model";
  wasi_nn_graph_t g;
  return wasi_nn_load_by_name(name, sizeof name - 1, &g);
}

static wasi_nn_errno_t oob_name(void) {
  wasi_nn_graph_t g;
  return wasi_nn_load_by_name(FAR_PTR(const char *), 200, &g);
}

static wasi_nn_errno_t long_name(void) {
  static char name[8192];
  wasi_nn_graph_t g;
  memset(name, 'a', sizeof name);
  return wasi_nn_load_by_name(name, sizeof name, &g);
}

static wasi_nn_errno_t oob_graph_result(void) {
  return wasi_nn_load_by_name(model, sizeof model - 1, FAR_PTR(wasi_nn_graph_t *));
}

static wasi_nn_errno_t bad_config(void) {
  static const char config[] = "{not json";
  wasi_nn_graph_t g;
  return wasi_nn_load_by_name_with_config(model, sizeof model - 1, config, sizeof config - 1, &g);
}

static wasi_nn_errno_t compute_single(void) { return wasi_nn_compute_single(computed()); }

static wasi_nn_errno_t double_finalize(void) {
  wasi_nn_context_t c = computed();
  serve_check("finalize_execution_context", wasi_nn_finalize_execution_context(c));
  return wasi_nn_finalize_execution_context(c);
}

static wasi_nn_errno_t use_after_finalize(void) {
  wasi_nn_context_t c = computed();
  serve_check("finalize_execution_context", wasi_nn_finalize_execution_context(c));
  return wasi_nn_compute(c);
}

static wasi_nn_errno_t unload_twice(void) {
  wasi_nn_graph_t g = graph();
  serve_check("unload", wasi_nn_unload(g));
  return wasi_nn_unload(g);
}

/* Contexts until the host refuses one; the errno of that refusal. All are finalized again. */
static wasi_nn_errno_t many_contexts(void) {
  static wasi_nn_context_t made[4096];
  wasi_nn_graph_t g = graph();
  wasi_nn_errno_t err = WASI_NN_SUCCESS;
  uint32_t n = 0;
  while (n < sizeof made / sizeof made[0]) {
    err = wasi_nn_init_execution_context(g, &made[n]);
    if (err != WASI_NN_SUCCESS)
      break;
    n++;
  }
  for (uint32_t i = 0; i < n; i++)
    serve_check("finalize_execution_context", wasi_nn_finalize_execution_context(made[i]));
  return err;
}

static const struct {
  const char *name;
  wasi_nn_errno_t (*call)(void);
} cases[] = {
    {"bad-graph", bad_graph},
    {"bad-context", bad_context},
    {"bad-context-compute", bad_context_compute},
    {"bad-context-output", bad_context_output},
    {"foreign-graph", foreign_graph},
    {"foreign-context", foreign_context},
    {"oob-tensor", oob_tensor},
    {"oob-dims", oob_dims},
    {"oob-data", oob_data},
    {"size-mismatch", size_mismatch},
    {"unknown-type", unknown_type},
    {"wrong-type", wrong_type},
    {"bad-input-index", bad_input_index},
    {"rank-too-large", rank_too_large},
    {"huge-rank", huge_rank},
    {"huge-dims", huge_dims},
    {"wrong-shape", wrong_shape},
    {"compute-before-input", compute_before_input},
    {"output-before-compute", output_before_compute},
    {"oob-output", oob_output},
    {"oob-written", oob_written},
    {"small-output", small_output},
    {"bad-output-index", bad_output_index},
    {"unknown-encoding", unknown_encoding},
    {"unknown-target", unknown_target},
    {"garbage-model", garbage_model},
    {"huge-builder", huge_builder},
    {"oob-builder", oob_builder},
    {"oob-builder-array", oob_builder_array},
    {"many-builders", many_builders},
    {"no-builders", no_builders},
    {"unknown-model", unknown_model},
    {"oob-name", oob_name},
    {"long-name", long_name},
    {"oob-graph-result", oob_graph_result},
    {"bad-config", bad_config},
    {"compute-single", compute_single},
    {"double-finalize", double_finalize},
    {"use-after-finalize", use_after_finalize},
    {"unload-twice", unload_twice},
    {"many-contexts", many_contexts},
};

int main(int argc, char **argv) {
  if (argc < 2 || argc > 3) {
    fputs("usage: hostile CASE [N]\n", stderr);
    return 1;
  }
  if (argc == 3)
    arg_n = (uint32_t)strtoul(argv[2], NULL, 0);
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    if (strcmp(argv[1], cases[i].name) != 0)
      continue;
    printf("errno %d\n", (int)cases[i].call());
    wasi_nn_context_t c = computed();
    uint32_t written = 0;
    serve_check("get_output", wasi_nn_get_output(c, 0, (uint8_t *)out, sizeof out, &written));
    for (uint32_t k = 0; k < written / 4; k++)
      printf("%.9g\n", (double)out[k]);
    return 0;
  }
  fprintf(stderr, "hostile: no case %s; cases:", argv[1]);
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    fprintf(stderr, " %s", cases[i].name);
  fputc('\n', stderr);
  return 1;
}
