/*
 * ops_linear.c: the "linear" op family (plan.h). Opcodes: agent/convert/ops/linear.py.
 */
#include "ea_math.h"

ea_kernel_fn ea_ops_linear(uint32_t opcode) {
  switch (opcode & 63u) {
  default: return 0;
  }
}
