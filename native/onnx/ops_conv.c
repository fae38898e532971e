/*
 * ops_conv.c: the "conv" op family (plan.h). Opcodes: agent/convert/ops/conv.py.
 */
#include "ea_math.h"

ea_kernel_fn ea_ops_conv(uint32_t opcode) {
  switch (opcode & 63u) {
  default: return ea_ops_pool(opcode); /* opcodes 32..63: ops_pool.c */
  }
}
