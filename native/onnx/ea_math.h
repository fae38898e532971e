/*
 * ea_math.h: small freestanding helpers shared by the kernels.
 * Math functions come from wasi-libc's libm (pure functions, no imports);
 * memcpy/memset from its libc, which the linker pulls in without any WASI import.
 */
#ifndef EA_MATH_H
#define EA_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "plan.h"

#define EA_MIN(a, b) ((a) < (b) ? (a) : (b))
#define EA_MAX(a, b) ((a) > (b) ? (a) : (b))

/* Row-major strides (in elements) of a tensor's dims. */
static inline void ea_strides(const ea_tensor_t *t, int32_t *strides) {
  int32_t s = 1;
  for (int32_t i = t->rank - 1; i >= 0; i--) {
    strides[i] = s;
    s *= t->dims[i];
  }
}

/* Scratch memory for one kernel call, reclaimed after the op (see interp.c). */
void *ea_scratch(uint32_t nbytes);

#endif /* EA_MATH_H */
