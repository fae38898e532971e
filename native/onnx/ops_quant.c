/*
 * ops_quant.c: the "quant" op family (plan.h). Opcodes: agent/convert/ops/quant.py.
 */
#include "ea_math.h"

ea_kernel_fn ea_ops_quant(uint32_t opcode) {
  switch (opcode & 63u) {
  default: return 0;
  }
}
