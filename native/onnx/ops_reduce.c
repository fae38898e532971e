/*
 * ops_reduce.c: the "reduce" op family (plan.h). Opcodes: agent/convert/ops/reduce.py.
 */
#include "ea_math.h"

ea_kernel_fn ea_ops_reduce(uint32_t opcode) {
  switch (opcode & 63u) {
  default: return 0;
  }
}
