/* cpu: which SIMD paths this CPU has, and the one the kernels use (see lmengine.h).
 *
 * Every entry point of the other files asks lme_get_isa() on each call and runs that path's
 * code: LME_ISA_SCALAR (portable C, any CPU), LME_ISA_AVX2 (AVX2 + FMA + F16C) or
 * LME_ISA_AVX512 (AVX-512 F/BW/VL + VNNI). The best path is selected when the library is loaded;
 * lme_set_isa forces another (tests run every path this way).
 */
#include "common.h"

int lme_cpu_has_isa(int isa) {
    if (isa == LME_ISA_SCALAR)
        return 1;
#if LME_X86
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                     && __builtin_cpu_supports("f16c");
    if (isa == LME_ISA_AVX2)
        return avx2;
    if (isa == LME_ISA_AVX512)
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
               && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

int lme_native_available(void) { return 1; }

int lme_best_isa(void) {
    if (lme_cpu_has_isa(LME_ISA_AVX512)) return LME_ISA_AVX512;
    if (lme_cpu_has_isa(LME_ISA_AVX2)) return LME_ISA_AVX2;
    return LME_ISA_SCALAR;
}

/* The path in use: the best one, chosen when the library is loaded (before any kernel runs, so
 * threads never race on it); lme_set_isa changes it. */
static int selected_isa = LME_ISA_SCALAR;

#if defined(__GNUC__) || defined(__clang__)
__attribute__((constructor)) static void select_best_isa(void) { selected_isa = lme_best_isa(); }
#endif

int lme_get_isa(void) { return selected_isa; }

int lme_set_isa(int isa) {
    if (isa == -1) {
        selected_isa = lme_best_isa();
        return LME_OK;
    }
    if (isa < LME_ISA_SCALAR || isa > LME_ISA_AVX512 || !lme_cpu_has_isa(isa))
        return LME_ERR_ISA;
    selected_isa = isa;
    return LME_OK;
}
