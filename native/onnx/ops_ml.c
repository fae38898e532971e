/*
 * ops_ml.c: the "ml" op family (plan.h). Opcodes: agent/convert/ops/ml.py.
 */
#include "ea_math.h"

ea_kernel_fn ea_ops_ml(uint32_t opcode) {
  switch (opcode & 63u) {
  default: return 0;
  }
}
