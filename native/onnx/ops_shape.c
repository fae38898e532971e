/*
 * ops_shape.c: the "shape" op family (plan.h). Opcodes: agent/convert/ops/shape.py.
 */
#include "ea_math.h"

ea_kernel_fn ea_ops_shape(uint32_t opcode) {
  switch (opcode & 63u) {
  default: return 0;
  }
}
