/*
 * ops_shape.c: the "shape" op family (plan.h): data movement. Opcodes and the
 * lowerings that emit them: agent/convert/ops/shape.py.
 *
 * Every kernel moves elements by their size (1, 4 or 8 bytes), so one kernel
 * serves every dtype. Shapes and strides come from the run-time dims: a
 * batched tensor's dims[0] is only known when ea_run sets it, so nothing here
 * precomputes a stride that involves it. The lowerings never ask a kernel to
 * move data across the batch axis (they refuse such graphs).
 */
#include "ea_math.h"
#ifdef __wasm_simd128__
#include <wasm_simd128.h>
#endif

enum {
  OP_TRANSPOSE = 0, /* in[0] -> out[0]; iattr: rank, perm[rank], view dims[rank] (view dims[0] < 0: inferred from count) */
  OP_CONCAT = 1,    /* in[0..n) -> out[0]; iattr: axis */
  OP_SPLIT = 2,     /* in[0] -> out[0..n); iattr: axis */
  OP_AXMAP = 3,     /* out[i..] = in[map_0(i0), ..., map_r(ir)] (Slice, Pad, Tile, Expand, Resize nearest); see op_axmap */
  OP_GATHER = 4,    /* in[0] data, in[1] indices (int32/int64) -> out[0]; iattr: axis */
  OP_LINEAR = 5,    /* 1-D linear interpolation along one axis (Resize linear, one pass per axis); see op_linear */
};

#define MODE_IDENTITY (-1)
#define MODE_BROADCAST (-2)

/* -- element copies by size ----------------------------------------------- */

/*
 * n bytes from src to dst (no overlap). Short copies (rows of a slice, a pad) stay inline: a call to
 * memcpy costs more than moving a few vectors. The attribute keeps clang from turning the loop back
 * into a memcpy call.
 */
__attribute__((no_builtin("memcpy"))) static void copy_bytes(unsigned char *restrict dst,
                                                             const unsigned char *restrict src, int64_t n) {
  if (n >= 1024) {
    memcpy(dst, src, (size_t)n);
    return;
  }
  int64_t i = 0;
#ifdef __wasm_simd128__
  for (; i + 16 <= n; i += 16) wasm_v128_store(dst + i, wasm_v128_load(src + i));
#endif
  for (; i + 4 <= n; i += 4) {
    uint32_t v;
    __builtin_memcpy(&v, src + i, 4);
    __builtin_memcpy(dst + i, &v, 4);
  }
  for (; i < n; i++) dst[i] = src[i];
}

/* n elements of `size` bytes from src to dst (no overlap). */
static void copy_elems(unsigned char *dst, const unsigned char *src, int64_t n, int32_t size) {
  if (n > 0) copy_bytes(dst, src, n * size);
}

/* n copies of the one element at `value` (size bytes) to dst. */
static void fill_elems(unsigned char *dst, const unsigned char *value, int64_t n, int32_t size) {
  switch (size) {
  case 1: memset(dst, value[0], (size_t)n); return;
  case 4: {
    uint32_t v;
    memcpy(&v, value, 4);
    uint32_t *o = (uint32_t *)(void *)dst;
    for (int64_t i = 0; i < n; i++) o[i] = v;
    return;
  }
  case 8: {
    uint64_t v;
    memcpy(&v, value, 8);
    uint64_t *o = (uint64_t *)(void *)dst;
    for (int64_t i = 0; i < n; i++) o[i] = v;
    return;
  }
  default:
    for (int64_t i = 0; i < n; i++) memcpy(dst + i * size, value, (size_t)size);
  }
}

/* dst[j] = src[map[j]] (map[j] < 0: the fill value), n elements of `size` bytes. */
static void gather_elems(unsigned char *dst, const unsigned char *src, const int32_t *map, int32_t n, int32_t size,
                         const unsigned char *fill) {
  switch (size) {
  case 1:
    for (int32_t j = 0; j < n; j++) dst[j] = map[j] < 0 ? fill[0] : src[map[j]];
    return;
  case 4: {
    uint32_t f;
    memcpy(&f, fill, 4);
    uint32_t *o = (uint32_t *)(void *)dst;
    const uint32_t *s = (const uint32_t *)(const void *)src;
    for (int32_t j = 0; j < n; j++) o[j] = map[j] < 0 ? f : s[map[j]];
    return;
  }
  case 8: {
    uint64_t f;
    memcpy(&f, fill, 8);
    uint64_t *o = (uint64_t *)(void *)dst;
    const uint64_t *s = (const uint64_t *)(const void *)src;
    for (int32_t j = 0; j < n; j++) o[j] = map[j] < 0 ? f : s[map[j]];
    return;
  }
  default:
    for (int32_t j = 0; j < n; j++) {
      if (map[j] < 0) memcpy(dst + (size_t)j * size, fill, (size_t)size);
      else memcpy(dst + (size_t)j * size, src + (size_t)map[j] * size, (size_t)size);
    }
  }
}

/* dst[j] = src[j * stride], n elements of `size` bytes (a strided read). */
static void strided_elems(unsigned char *dst, const unsigned char *src, int32_t n, int64_t stride, int32_t size) {
  switch (size) {
  case 1:
    for (int32_t j = 0; j < n; j++) dst[j] = src[j * stride];
    return;
  case 4: {
    uint32_t *o = (uint32_t *)(void *)dst;
    const uint32_t *s = (const uint32_t *)(const void *)src;
    for (int32_t j = 0; j < n; j++) o[j] = s[j * stride];
    return;
  }
  case 8: {
    uint64_t *o = (uint64_t *)(void *)dst;
    const uint64_t *s = (const uint64_t *)(const void *)src;
    for (int32_t j = 0; j < n; j++) o[j] = s[j * stride];
    return;
  }
  default:
    for (int32_t j = 0; j < n; j++) memcpy(dst + (size_t)j * size, src + (size_t)(j * stride) * size, (size_t)size);
  }
}

static int64_t prod(const int32_t *dims, int32_t from, int32_t to) {
  int64_t n = 1;
  for (int32_t i = from; i < to; i++) n *= dims[i];
  return n;
}

/* -- Transpose ------------------------------------------------------------ */

/*
 * A 2-D block transpose: y[b * ys + a] = x[a * xs + b] for a < na, b < nb
 * (x's rows are contiguous along b, y's along a). Tiles keep both sides in cache.
 */
#define TILE 16
#define DEFINE_TRANSPOSE2D(NAME, T)                                                                          \
  static void NAME(T *restrict y, const T *restrict x, int32_t na, int32_t nb, int64_t xs, int64_t ys) {     \
    for (int32_t a0 = 0; a0 < na; a0 += TILE) {                                                              \
      int32_t a1 = EA_MIN(a0 + TILE, na);                                                                    \
      for (int32_t b0 = 0; b0 < nb; b0 += TILE) {                                                            \
        int32_t b1 = EA_MIN(b0 + TILE, nb);                                                                  \
        for (int32_t b = b0; b < b1; b++) {                                                                  \
          T *yr = y + b * ys;                                                                                \
          const T *xc = x + b;                                                                               \
          for (int32_t a = a0; a < a1; a++) yr[a] = xc[a * xs];                                              \
        }                                                                                                    \
      }                                                                                                      \
    }                                                                                                        \
  }
DEFINE_TRANSPOSE2D(transpose2d_u8, uint8_t)
DEFINE_TRANSPOSE2D(transpose2d_u32, uint32_t)
DEFINE_TRANSPOSE2D(transpose2d_u64, uint64_t)

#ifdef __wasm_simd128__
/* 4-byte elements: 4x4 register transposes inside each tile, scalar at the ragged edges. */
static void transpose2d_u32_simd(uint32_t *restrict y, const uint32_t *restrict x, int32_t na, int32_t nb, int64_t xs,
                                 int64_t ys) {
  for (int32_t a0 = 0; a0 < na; a0 += TILE) {
    int32_t a1 = EA_MIN(a0 + TILE, na), a4 = a0 + ((a1 - a0) & ~3);
    for (int32_t b0 = 0; b0 < nb; b0 += TILE) {
      int32_t b1 = EA_MIN(b0 + TILE, nb), b4 = b0 + ((b1 - b0) & ~3);
      for (int32_t a = a0; a < a4; a += 4) {
        for (int32_t b = b0; b < b4; b += 4) {
          v128_t r0 = wasm_v128_load(x + a * xs + b);
          v128_t r1 = wasm_v128_load(x + (a + 1) * xs + b);
          v128_t r2 = wasm_v128_load(x + (a + 2) * xs + b);
          v128_t r3 = wasm_v128_load(x + (a + 3) * xs + b);
          v128_t t0 = wasm_i32x4_shuffle(r0, r1, 0, 4, 1, 5);
          v128_t t1 = wasm_i32x4_shuffle(r2, r3, 0, 4, 1, 5);
          v128_t t2 = wasm_i32x4_shuffle(r0, r1, 2, 6, 3, 7);
          v128_t t3 = wasm_i32x4_shuffle(r2, r3, 2, 6, 3, 7);
          wasm_v128_store(y + b * ys + a, wasm_i64x2_shuffle(t0, t1, 0, 2));
          wasm_v128_store(y + (b + 1) * ys + a, wasm_i64x2_shuffle(t0, t1, 1, 3));
          wasm_v128_store(y + (b + 2) * ys + a, wasm_i64x2_shuffle(t2, t3, 0, 2));
          wasm_v128_store(y + (b + 3) * ys + a, wasm_i64x2_shuffle(t2, t3, 1, 3));
        }
        for (int32_t b = b4; b < b1; b++)
          for (int32_t k = 0; k < 4; k++) y[b * ys + a + k] = x[(a + k) * xs + b];
      }
      for (int32_t b = b0; b < b1; b++)
        for (int32_t a = a4; a < a1; a++) y[b * ys + a] = x[a * xs + b];
    }
  }
}
#endif

static void transpose2d(unsigned char *y, const unsigned char *x, int32_t na, int32_t nb, int64_t xs, int64_t ys,
                        int32_t size) {
  switch (size) {
  case 1: transpose2d_u8(y, x, na, nb, xs, ys); return;
  case 4:
#ifdef __wasm_simd128__
    if (na >= 4 && nb >= 4) {
      transpose2d_u32_simd((uint32_t *)(void *)y, (const uint32_t *)(const void *)x, na, nb, xs, ys);
      return;
    }
#endif
    transpose2d_u32((uint32_t *)(void *)y, (const uint32_t *)(const void *)x, na, nb, xs, ys);
    return;
  case 8: transpose2d_u64((uint64_t *)(void *)y, (const uint64_t *)(const void *)x, na, nb, xs, ys); return;
  default:
    for (int32_t a = 0; a < na; a++)
      for (int32_t b = 0; b < nb; b++)
        memcpy(y + (size_t)(b * ys + a) * size, x + (size_t)(a * xs + b) * size, (size_t)size);
  }
}

static int32_t op_transpose(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  int32_t size = ea_dtype_size(x->dtype);
  if (op->n_i < 1) return EA_ERR_INTERNAL;
  int32_t rank = op->iattr[0];
  if (rank < 0 || rank > EA_MAX_RANK || op->n_i != 1 + 2 * rank || x->count != y->count || x->dtype != y->dtype)
    return EA_ERR_INTERNAL;
  if (x->count == 0) return EA_OK;
  const int32_t *perm = op->iattr + 1;
  const int32_t *view = op->iattr + 1 + rank;

  /* The input's dims as the op sees them (the view's first dim follows the batch). */
  int32_t dims[EA_MAX_RANK];
  int64_t rest = 1;
  for (int32_t i = 0; i < rank; i++) {
    dims[i] = view[i];
    if (i > 0) rest *= view[i];
  }
  if (rank > 0 && view[0] < 0) dims[0] = (int32_t)(x->count / rest);
  if (prod(dims, 0, rank) != x->count) return EA_ERR_INTERNAL;

  /* Simplify: drop size-1 axes, then merge input axes that stay next to each other in the output. */
  int32_t newidx[EA_MAX_RANK], kept = 0;
  for (int32_t i = 0; i < rank; i++) newidx[i] = dims[i] > 1 ? kept++ : -1;
  int32_t p1[EA_MAX_RANK], d1[EA_MAX_RANK], r1 = 0;
  for (int32_t i = 0; i < rank; i++)
    if (dims[i] > 1) d1[newidx[i]] = dims[i];
  for (int32_t j = 0; j < rank; j++) {
    int32_t a = perm[j];
    if (a < 0 || a >= rank) return EA_ERR_INTERNAL;
    if (newidx[a] >= 0) p1[r1++] = newidx[a];
  }
  /* Groups of output positions whose input axes are consecutive. */
  int32_t group_of_in[EA_MAX_RANK]; /* input axis -> group id (in output order) */
  int32_t ngroups = 0;
  for (int32_t j = 0; j < r1; j++) {
    if (j == 0 || p1[j] != p1[j - 1] + 1) ngroups++;
    group_of_in[p1[j]] = ngroups - 1;
  }
  /* Groups in input order: input axis 0.. visits groups in some order; a group is a run of input axes. */
  int32_t D[EA_MAX_RANK], P[EA_MAX_RANK], in_pos_of_group[EA_MAX_RANK];
  int32_t r = 0;
  for (int32_t i = 0; i < r1; i++) {
    if (i == 0 || group_of_in[i] != group_of_in[i - 1]) {
      in_pos_of_group[group_of_in[i]] = r;
      D[r++] = d1[i];
    } else {
      D[r - 1] *= d1[i];
    }
  }
  for (int32_t g = 0; g < ngroups; g++) P[g] = in_pos_of_group[g];

  const unsigned char *src = x->data;
  unsigned char *dst = y->data;
  if (r <= 1) {
    copy_elems(dst, src, x->count, size);
    return EA_OK;
  }
  int64_t S[EA_MAX_RANK]; /* input strides (elements) */
  S[r - 1] = 1;
  for (int32_t i = r - 2; i >= 0; i--) S[i] = S[i + 1] * D[i + 1];
  int32_t OD[EA_MAX_RANK]; /* output dims */
  int64_t OS[EA_MAX_RANK]; /* output strides */
  for (int32_t j = 0; j < r; j++) OD[j] = D[P[j]];
  OS[r - 1] = 1;
  for (int32_t j = r - 2; j >= 0; j--) OS[j] = OS[j + 1] * OD[j + 1];

  int32_t a_in = P[r - 1], qb = -1;
  for (int32_t j = 0; j < r; j++)
    if (P[j] == r - 1) qb = j;
  if (qb < 0) return EA_ERR_INTERNAL;
  if (a_in == r - 1) {
    /* The last axis stays last: whole rows move. */
    int32_t idx[EA_MAX_RANK] = {0};
    int64_t rows = x->count / D[r - 1], row_bytes = (int64_t)D[r - 1] * size;
    for (int64_t o = 0; o < rows; o++, dst += row_bytes) {
      int64_t xoff = 0;
      for (int32_t k = 0; k < r - 1; k++) xoff += idx[k] * S[P[k]];
      memcpy(dst, src + xoff * size, (size_t)row_bytes);
      for (int32_t k = r - 2; k >= 0; k--) {
        if (++idx[k] < OD[k]) break;
        idx[k] = 0;
      }
    }
    return EA_OK;
  }
  /* The two innermost axes: A = the input axis that is the output's last (output stride 1), B = the
     input's last axis (input stride 1), at output position qb. Tile over (A, B); loop over the rest. */
  int32_t na = D[a_in], nb = D[r - 1];
  int64_t xs = S[a_in], ys = OS[qb];
  /* Other output axes, outermost first. */
  int32_t ox[EA_MAX_RANK], no = 0;
  for (int32_t j = 0; j < r; j++)
    if (j != r - 1 && j != qb) ox[no++] = j;
  int32_t idx[EA_MAX_RANK] = {0};
  int64_t outer = 1;
  for (int32_t k = 0; k < no; k++) outer *= OD[ox[k]];
  for (int64_t o = 0; o < outer; o++) {
    int64_t xoff = 0, yoff = 0;
    for (int32_t k = 0; k < no; k++) {
      xoff += idx[k] * S[P[ox[k]]];
      yoff += idx[k] * OS[ox[k]];
    }
    if (nb == 1) strided_elems(dst + yoff * size, src + xoff * size, na, xs, size);
    else transpose2d(dst + yoff * size, src + xoff * size, na, nb, xs, ys, size);
    for (int32_t k = no - 1; k >= 0; k--) {
      if (++idx[k] < OD[ox[k]]) break;
      idx[k] = 0;
    }
  }
  return EA_OK;
}

/* -- Concat / Split ------------------------------------------------------- */

static int32_t op_concat(const ea_op_t *op) {
  ea_tensor_t *y = op->out[0];
  if (op->n_i != 1) return EA_ERR_INTERNAL;
  int32_t axis = op->iattr[0];
  int32_t size = ea_dtype_size(y->dtype);
  if (axis < 0 || axis >= y->rank) return EA_ERR_INTERNAL;
  int64_t outer = prod(y->dims, 0, axis);
  int64_t total = 0;
  for (int32_t i = 0; i < op->n_in; i++) {
    const ea_tensor_t *x = op->in[i];
    if (!x || x->rank != y->rank || x->dtype != y->dtype) return EA_ERR_INTERNAL;
    total += x->count;
  }
  if (total != y->count) return EA_ERR_INTERNAL;
  unsigned char *dst = y->data;
  for (int64_t o = 0; o < outer; o++) {
    for (int32_t i = 0; i < op->n_in; i++) {
      const ea_tensor_t *x = op->in[i];
      int64_t chunk = outer ? x->count / outer : 0;
      copy_elems(dst, (const unsigned char *)x->data + o * chunk * size, chunk, size);
      dst += chunk * size;
    }
  }
  return EA_OK;
}

static int32_t op_split(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  if (op->n_i != 1) return EA_ERR_INTERNAL;
  int32_t axis = op->iattr[0];
  int32_t size = ea_dtype_size(x->dtype);
  if (axis < 0 || axis >= x->rank) return EA_ERR_INTERNAL;
  int64_t outer = prod(x->dims, 0, axis);
  int64_t total = 0;
  for (int32_t i = 0; i < op->n_out; i++) {
    const ea_tensor_t *y = op->out[i];
    if (y->rank != x->rank || y->dtype != x->dtype) return EA_ERR_INTERNAL;
    total += y->count;
  }
  if (total != x->count) return EA_ERR_INTERNAL;
  const unsigned char *src = x->data;
  for (int64_t o = 0; o < outer; o++) {
    for (int32_t i = 0; i < op->n_out; i++) {
      ea_tensor_t *y = op->out[i];
      int64_t chunk = outer ? y->count / outer : 0;
      copy_elems((unsigned char *)y->data + o * chunk * size, src, chunk, size);
      src += chunk * size;
    }
  }
  return EA_OK;
}

/* -- Axis maps: Slice, Pad, Tile, Expand, Resize (nearest) ---------------- */

/*
 * out[i_0, ..., i_r-1] = in[m_0(i_0), ..., m_r-1(i_r-1)], or the fill value when any m_a(i_a) < 0.
 * in[1]: int32 maps, concatenated (absent when no axis has one); in[2]: the fill value, one element of
 * the data's dtype (absent: zero). iattr: mode[rank]. mode[a]: MODE_IDENTITY (m(i) = i),
 * MODE_BROADCAST (m(i) = 0), or the offset of axis a's map in in[1] (out dims[a] entries).
 * The input's rank may be lower than the output's (Expand): its dims align to the right and the
 * missing ones are 1.
 *
 * Rows (the last axis) are the unit of work. Trailing identity axes merge into larger elements; a
 * row whose map is fill, a contiguous run, then fill (Slice, Pad) is two fills and one copy; a row
 * that reads the same input as the previous one (Resize upsampling, Tile, Expand) copies it.
 */
static int32_t op_axmap(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  const ea_tensor_t *maps_t = op->n_in > 1 ? op->in[1] : 0;
  const ea_tensor_t *fill_t = op->n_in > 2 ? op->in[2] : 0;
  int32_t rank = y->rank;
  int32_t size = ea_dtype_size(y->dtype);
  if (op->n_i != rank || x->rank > rank || x->dtype != y->dtype) return EA_ERR_INTERNAL;
  if (fill_t && (fill_t->dtype != y->dtype || fill_t->count < 1)) return EA_ERR_INTERNAL;
  if (y->count == 0) return EA_OK;
  const int32_t *maps = maps_t ? (const int32_t *)maps_t->data : 0;
  int32_t nmaps = maps_t ? maps_t->count : 0;
  int32_t mode[EA_MAX_RANK];
  for (int32_t a = 0; a < rank; a++) {
    mode[a] = op->iattr[a];
    if (mode[a] >= 0 && (!maps || mode[a] + y->dims[a] > nmaps)) return EA_ERR_INTERNAL;
    if (mode[a] < MODE_BROADCAST) return EA_ERR_INTERNAL;
  }
  static const unsigned char zero[16];
  const unsigned char *fill = fill_t ? (const unsigned char *)fill_t->data : zero;
  if (rank == 0) {
    copy_elems(y->data, x->data, 1, size);
    return EA_OK;
  }
  int32_t xd[EA_MAX_RANK];
  int32_t pad = rank - x->rank;
  for (int32_t a = 0; a < rank; a++) xd[a] = a < pad ? 1 : x->dims[a - pad];
  for (int32_t a = 0; a < rank; a++) {
    if (mode[a] == MODE_IDENTITY && xd[a] < y->dims[a]) return EA_ERR_INTERNAL;
    if (mode[a] >= 0)
      for (int32_t i = 0; i < y->dims[a]; i++)
        if (maps[mode[a] + i] >= xd[a]) return EA_ERR_INTERNAL;
  }

  /* Trailing identity axes of equal extent move as one block: fewer, larger elements. */
  int32_t r = rank;
  int64_t block = 1;
  while (r > 1 && mode[r - 1] == MODE_IDENTITY && xd[r - 1] == y->dims[r - 1]) {
    block *= xd[r - 1];
    r--;
  }
  if (r == 1 && mode[0] == MODE_IDENTITY && xd[0] == y->dims[0]) {
    copy_elems(y->data, x->data, y->count, size);
    return EA_OK;
  }
  int64_t esize = block * size; /* bytes per (block) element */
  int64_t xs[EA_MAX_RANK];
  xs[r - 1] = 1;
  for (int32_t a = r - 2; a >= 0; a--) xs[a] = xs[a + 1] * xd[a + 1];

  const unsigned char *src = x->data;
  unsigned char *dst = y->data;
  int32_t inner = y->dims[r - 1];
  int32_t last = mode[r - 1];
  const int32_t *lmap = last >= 0 ? maps + last : 0;
  /* The last axis's map as fill * lead, a run of `run` consecutive indices from `first`, fill. */
  int32_t lead = 0, run = 0, first = 0;
  if (lmap) {
    while (lead < inner && lmap[lead] < 0) lead++;
    if (lead < inner) {
      first = lmap[lead];
      while (lead + run < inner && lmap[lead + run] == first + run) run++;
      for (int32_t j = lead + run; j < inner; j++)
        if (lmap[j] >= 0) run = -1; /* not that shape: gather */
    }
  }
  int64_t rows = 1;
  for (int32_t a = 0; a < r - 1; a++) rows *= y->dims[a];
  int32_t idx[EA_MAX_RANK] = {0};
  int64_t row_bytes = (int64_t)inner * esize;
  int64_t prev_base = -2;
  for (int64_t row = 0; row < rows; row++, dst += row_bytes) {
    int64_t base = 0;
    for (int32_t a = 0; a < r - 1; a++) {
      int32_t m = mode[a] == MODE_IDENTITY ? idx[a] : mode[a] == MODE_BROADCAST ? 0 : maps[mode[a] + idx[a]];
      if (m < 0) {
        base = -1;
        break;
      }
      base += m * xs[a];
    }
    for (int32_t a = r - 2; a >= 0; a--) {
      if (++idx[a] < y->dims[a]) break;
      idx[a] = 0;
    }
    if (base == prev_base) {
      copy_bytes(dst, dst - row_bytes, row_bytes); /* the same input row as the previous output row */
      continue;
    }
    prev_base = base;
    if (base < 0) {
      fill_elems(dst, fill, (int64_t)inner * block, size);
    } else if (last == MODE_IDENTITY) {
      copy_bytes(dst, src + base * esize, row_bytes);
    } else if (last == MODE_BROADCAST) {
      for (int32_t j = 0; j < inner; j++) copy_bytes(dst + j * esize, src + base * esize, esize);
    } else if (run >= 0) {
      fill_elems(dst, fill, (int64_t)lead * block, size);
      copy_bytes(dst + lead * esize, src + (base + first) * esize, run * esize);
      fill_elems(dst + (lead + run) * esize, fill, (int64_t)(inner - lead - run) * block, size);
    } else if (block == 1) {
      gather_elems(dst, src + base * esize, lmap, inner, size, fill);
    } else {
      for (int32_t j = 0; j < inner; j++) {
        if (lmap[j] < 0) fill_elems(dst + j * esize, fill, block, size);
        else copy_bytes(dst + j * esize, src + (base + lmap[j]) * esize, esize);
      }
    }
  }
  return EA_OK;
}

/* -- Gather --------------------------------------------------------------- */

static int32_t op_gather(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  const ea_tensor_t *ind = op->in[1];
  ea_tensor_t *y = op->out[0];
  if (op->n_i != 1 || x->dtype != y->dtype) return EA_ERR_INTERNAL;
  int32_t axis = op->iattr[0];
  if (axis < 0 || axis >= x->rank) return EA_ERR_INTERNAL;
  int32_t size = ea_dtype_size(x->dtype);
  int64_t outer = prod(x->dims, 0, axis);
  int64_t extent = x->dims[axis];
  int64_t inner = prod(x->dims, axis + 1, x->rank);
  int64_t n = ind->count;
  if (outer * n * inner != y->count) return EA_ERR_INTERNAL;
  if (y->count == 0) return EA_OK;
  /* Resolve the indices once (negative ones count from the end). */
  int32_t *k = ea_scratch((uint32_t)(n * 4));
  if (!k) return EA_ERR_NOMEM;
  for (int64_t j = 0; j < n; j++) {
    int64_t v;
    if (ind->dtype == EA_I64) v = ((const int64_t *)ind->data)[j];
    else if (ind->dtype == EA_I32) v = ((const int32_t *)ind->data)[j];
    else return EA_ERR_INTERNAL;
    if (v < 0) v += extent;
    if (v < 0 || v >= extent) return EA_ERR_INPUT;
    k[j] = (int32_t)v;
  }
  const unsigned char *src = x->data;
  unsigned char *dst = y->data;
  if (inner == 1) {
    for (int64_t o = 0; o < outer; o++) {
      gather_elems(dst, src + o * extent * size, k, (int32_t)n, size, src);
      dst += n * size;
    }
    return EA_OK;
  }
  int64_t bytes = inner * size;
  for (int64_t o = 0; o < outer; o++) {
    const unsigned char *base = src + o * extent * bytes;
    for (int64_t j = 0; j < n; j++, dst += bytes) memcpy(dst, base + (int64_t)k[j] * bytes, (size_t)bytes);
  }
  return EA_OK;
}

/* -- Linear interpolation along one axis ----------------------------------- */

/*
 * in[0] float x, in[1] int32 pairs (i0, i1) per output position along the axis, in[2] float pairs
 * (w0, w1): y[.., j, ..] = w0 * x[.., i0, ..] + w1 * x[.., i1, ..]. iattr: axis.
 */
static int32_t op_linear(const ea_op_t *op) {
  const ea_tensor_t *x = op->in[0];
  ea_tensor_t *y = op->out[0];
  if (op->n_i != 1 || op->n_in != 3 || x->dtype != EA_F32 || y->dtype != EA_F32) return EA_ERR_INTERNAL;
  int32_t axis = op->iattr[0];
  if (axis < 0 || axis >= x->rank || y->rank != x->rank) return EA_ERR_INTERNAL;
  int32_t len = y->dims[axis], extent = x->dims[axis];
  if (op->in[1]->count != 2 * len || op->in[2]->count != 2 * len) return EA_ERR_INTERNAL;
  const int32_t *ii = op->in[1]->data;
  const float *ww = op->in[2]->data;
  for (int32_t j = 0; j < 2 * len; j++)
    if (ii[j] < 0 || ii[j] >= extent) return EA_ERR_INTERNAL;
  int64_t outer = prod(x->dims, 0, axis);
  int64_t inner = prod(x->dims, axis + 1, x->rank);
  const float *src = x->data;
  float *dst = y->data;
  if (inner == 1) {
    for (int64_t o = 0; o < outer; o++) {
      const float *xr = src + o * extent;
      float *yr = dst + o * len;
      for (int32_t j = 0; j < len; j++) yr[j] = ww[2 * j] * xr[ii[2 * j]] + ww[2 * j + 1] * xr[ii[2 * j + 1]];
    }
    return EA_OK;
  }
  for (int64_t o = 0; o < outer; o++) {
    const float *xb = src + o * extent * inner;
    float *yb = dst + o * len * inner;
    for (int32_t j = 0; j < len; j++) {
      const float *restrict a = xb + ii[2 * j] * inner;
      const float *restrict b = xb + ii[2 * j + 1] * inner;
      float *restrict yr = yb + j * inner;
      float w0 = ww[2 * j], w1 = ww[2 * j + 1];
      for (int64_t k = 0; k < inner; k++) yr[k] = w0 * a[k] + w1 * b[k];
    }
  }
  return EA_OK;
}

ea_kernel_fn ea_ops_shape(uint32_t opcode) {
  switch (opcode & 63u) {
  case OP_TRANSPOSE: return op_transpose;
  case OP_CONCAT: return op_concat;
  case OP_SPLIT: return op_split;
  case OP_AXMAP: return op_axmap;
  case OP_GATHER: return op_gather;
  case OP_LINEAR: return op_linear;
  default: return 0;
  }
}
