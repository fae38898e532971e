/*
 * ops_norm.c: the "norm" op family (plan.h). Opcodes: agent/convert/ops/norm.py.
 */
#include "ea_math.h"

ea_kernel_fn ea_ops_norm(uint32_t opcode) {
  switch (opcode & 63u) {
  default: return 0;
  }
}
