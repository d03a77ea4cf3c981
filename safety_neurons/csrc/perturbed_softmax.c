/* Exact q/k importance on the CPU: for every channel of a head, the perturbed softmax and the norm of
 * the output change it causes, fused into one pass (METHOD 2; safety_neurons/importance.py builds the
 * inputs and documents the algebra, safety_neurons/native.py compiles and calls this file).
 *
 * One work item is one scored query row of one head (q) or of one key/value group (k, whose gs query
 * heads are the item's "sub-rows"). For channel j of an item and sub-row i, over the visible keys s in
 * [lo, hi) (a contiguous range in the key order the caller uses):
 *
 *     z_is = (S_is + a_ji X_js + b_ji Y_js) * rho_js          (rho omitted when R is NULL)
 *     z_is = cap * tanh(z_is / cap)                            (when cap > 0)
 *     dP_is = softmax_s(z_i)_s - softmax_s(S_i)_s              (S soft-capped alike)
 *     out_j = || sum_{s, i} dP_is F[s * n_sub + i, :] ||_2
 *
 * F's rows are in (key, sub-row) order; with tri != 0, F is lower-triangular (row m has no entries past
 * column m); with sub_cols > 0 (and a full F), the rows of sub-row i have no entries in columns
 * >= (i + 1) * sub_cols (k's factor: the group's R is triangular), and those are skipped. F's rows
 * are rp columns apart, rp a multiple of the vector tile, zero past its r columns.
 * Both precisions come from one template (REAL = float / double). The code uses GCC/Clang vector
 * extensions only, so it builds on any target the compiler knows (x86 AVX2/AVX-512, ARM NEON/SVE). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLK 6 /* channels whose output-change products share one pass over F */
#define NEG_FILL (-1e30) /* logit of a padding lane (past the row's keys): it cannot be the max; its probability is masked to 0 */

int sn_abi_version(void) { return 3; }

#ifdef _OPENMP
#include <omp.h>
#define SN_THREAD_NUM() omp_get_thread_num()
int sn_threads(void) { return omp_get_max_threads(); } /* what a parallel region of this runtime gets */
#else
#define SN_THREAD_NUM() 0
int sn_threads(void) { return 0; } /* built without OpenMP: the caller splits the work over threads */
#endif

/* the kernel, once per precision: perturbed_softmax_impl.h reads REAL, IREAL (same-size integer),
 * LANES (32-byte vectors), NAME and the exp constants */
#define REAL float
#define IREAL int32_t
#define LANES 8
#define NAME(x) x##_f32
#define EXP_MIN (-87.0)
#define EXP_MAGIC 12582912.0
#define LN2_HI 0.693145751953125
#define LN2_LO 1.42860682030941723e-6
#define EXP_DEG 7
#define EXP_BIAS 127
#define EXP_MANT 23
#define TANH_SMALL 0.1
#include "perturbed_softmax_impl.h"
#undef REAL
#undef IREAL
#undef LANES
#undef NAME
#undef EXP_MIN
#undef EXP_MAGIC
#undef LN2_HI
#undef LN2_LO
#undef EXP_DEG
#undef EXP_BIAS
#undef EXP_MANT
#undef TANH_SMALL

#define REAL double
#define IREAL int64_t
#define LANES 4
#define NAME(x) x##_f64
#define EXP_MIN (-708.0)
#define EXP_MAGIC 6755399441055744.0
#define LN2_HI 6.93147180369123816490e-01
#define LN2_LO 1.90821492927058770002e-10
#define EXP_DEG 13
#define EXP_BIAS 1023
#define EXP_MANT 52
#define TANH_SMALL 0.05
#include "perturbed_softmax_impl.h"
