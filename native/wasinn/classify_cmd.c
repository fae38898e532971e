/*
 * classify_cmd — a WASI-NN command app, like the wasi-nn crate's classification example.
 *
 *   classify_cmd [--dims D0,D1,...] [--load MODEL_FILE [--encoding N]] MODEL_NAME INPUT_FILE
 *
 * Reads INPUT_FILE (raw little-endian f32, row-major) through a preopened
 * directory, loads the graph by name (load_by_name MODEL_NAME) or, with --load,
 * from MODEL_FILE's bytes (load, encoding N, default onnx; MODEL_NAME is then
 * only a label), sets it as input 0 with dimensions --dims (default [1, n]),
 * computes, and prints output 0's floats to stdout, one per line, as %.9g
 * (enough digits to give back the exact f32).
 *
 * Exit status: 0 ok; 1 usage or I/O; 2 a wasi-nn call failed, with
 * "classify_cmd: CALL: errno N" on stderr.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wasi_nn.h"

#define MAX_DIMS 8
#define OUTPUT_MAX (4u << 20) /* bytes of output 0 it accepts */

static void usage(void) {
  fputs("usage: classify_cmd [--dims D0,D1,...] [--load MODEL_FILE [--encoding N]] MODEL_NAME INPUT_FILE\n", stderr);
  exit(1);
}

static uint8_t *read_file(const char *path, uint32_t *len) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) {
    fprintf(stderr, "classify_cmd: cannot open %s: %s\n", path, strerror(errno));
    exit(1);
  }
  size_t cap = 1 << 16, n = 0;
  uint8_t *buf = malloc(cap);
  for (;;) {
    if (buf == NULL) {
      fputs("classify_cmd: out of memory\n", stderr);
      exit(1);
    }
    n += fread(buf + n, 1, cap - n, f);
    if (n < cap)
      break;
    cap *= 2;
    buf = realloc(buf, cap);
  }
  if (ferror(f)) {
    fprintf(stderr, "classify_cmd: cannot read %s\n", path);
    exit(1);
  }
  fclose(f);
  *len = (uint32_t)n;
  return buf;
}

static void check(const char *call, wasi_nn_errno_t err) {
  if (err != WASI_NN_SUCCESS) {
    fprintf(stderr, "classify_cmd: %s: errno %d\n", call, (int)err);
    exit(2);
  }
}

static uint32_t parse_dims(const char *text, uint32_t *dims) {
  uint32_t rank = 0;
  const char *p = text;
  while (*p) {
    char *end;
    unsigned long d = strtoul(p, &end, 10);
    if (end == p || rank == MAX_DIMS || d > 0xFFFFFFFFul)
      usage();
    dims[rank++] = (uint32_t)d;
    p = end;
    if (*p == ',')
      p++;
    else if (*p)
      usage();
  }
  return rank;
}

int main(int argc, char **argv) {
  uint32_t dims[MAX_DIMS];
  uint32_t rank = 0;
  const char *load_path = NULL;
  uint32_t encoding = WASI_NN_ENCODING_ONNX;
  int i = 1;
  for (; i < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
    if (i + 1 >= argc)
      usage();
    if (strcmp(argv[i], "--dims") == 0)
      rank = parse_dims(argv[i + 1], dims);
    else if (strcmp(argv[i], "--load") == 0)
      load_path = argv[i + 1];
    else if (strcmp(argv[i], "--encoding") == 0)
      encoding = (uint32_t)strtoul(argv[i + 1], NULL, 10);
    else
      usage();
  }
  if (argc - i != 2)
    usage();
  const char *name = argv[i];
  uint32_t input_len;
  uint8_t *input = read_file(argv[i + 1], &input_len);
  if (rank == 0) {
    dims[0] = 1;
    dims[1] = input_len / 4;
    rank = 2;
  }

  wasi_nn_graph_t graph;
  if (load_path != NULL) {
    wasi_nn_graph_builder_t builder;
    builder.buf = read_file(load_path, &builder.len);
    check("load", wasi_nn_load(&builder, 1, encoding, WASI_NN_TARGET_CPU, &graph));
  } else {
    check("load_by_name", wasi_nn_load_by_name(name, (uint32_t)strlen(name), &graph));
  }
  wasi_nn_context_t ctx;
  check("init_execution_context", wasi_nn_init_execution_context(graph, &ctx));

  wasi_nn_tensor_t tensor;
  memset(&tensor, 0, sizeof tensor);
  tensor.dims = dims;
  tensor.rank = rank;
  tensor.type = WASI_NN_TYPE_F32;
  tensor.data = input;
  tensor.data_len = input_len;
  check("set_input", wasi_nn_set_input(ctx, 0, &tensor));
  check("compute", wasi_nn_compute(ctx));

  float *out = malloc(OUTPUT_MAX);
  if (out == NULL) {
    fputs("classify_cmd: out of memory\n", stderr);
    return 1;
  }
  uint32_t written = 0;
  check("get_output", wasi_nn_get_output(ctx, 0, (uint8_t *)out, OUTPUT_MAX, &written));
  for (uint32_t k = 0; k < written / 4; k++)
    printf("%.9g\n", (double)out[k]);
  return 0;
}
