/*
 * ops_unary.c: the "unary" op family (plan.h). Opcodes: agent/convert/ops/unary.py.
 */
#include "ea_math.h"

ea_kernel_fn ea_ops_unary(uint32_t opcode) {
  switch (opcode & 63u) {
  default: return 0;
  }
}
