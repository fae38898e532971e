/*
 * ops_binary.c: the "binary" op family (plan.h). Opcodes: agent/convert/ops/binary.py.
 */
#include "ea_math.h"

ea_kernel_fn ea_ops_binary(uint32_t opcode) {
  switch (opcode & 63u) {
  default: return 0;
  }
}
