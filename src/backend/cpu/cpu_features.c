/* Run-time CPU feature detection for the low-precision kernels (lowp.h). The library may be built
 * for a generic x86-64 (DITMOE_NATIVE=OFF) or for another CPU than it runs on, so the AVX512
 * kernels carry their own target attributes and are chosen here, per call, from cpuid (GCC's
 * __builtin_cpu_supports, which also checks that the OS saves the zmm state). */
#include "backend/cpu/lowp.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned detect_cpu(void)
{
    unsigned m = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        m |= DM_CPU_AVX512;
    if ((m & DM_CPU_AVX512) && __builtin_cpu_supports("avx512bf16")) m |= DM_CPU_AVX512_BF16;
    if ((m & DM_CPU_AVX512) && __builtin_cpu_supports("avx512vnni")) m |= DM_CPU_AVX512_VNNI;
#endif
    return m;
}

/* $DITMOE_CPU_FEATURES: unset/"native" = all detected, "generic"/"none" = none, else a list. */
static unsigned env_mask(void)
{
    const char *s = getenv("DITMOE_CPU_FEATURES");
    if (!s || !*s || !strcmp(s, "native")) return ~0u;
    if (!strcmp(s, "generic") || !strcmp(s, "none")) return 0;
    unsigned m = 0;
    char buf[128];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (!strcmp(t, "avx512")) m |= DM_CPU_AVX512;
        else if (!strcmp(t, "bf16")) m |= DM_CPU_AVX512 | DM_CPU_AVX512_BF16;
        else if (!strcmp(t, "vnni")) m |= DM_CPU_AVX512 | DM_CPU_AVX512_VNNI;
        else dm_log(DM_LOG_INFO, "DITMOE_CPU_FEATURES: unknown feature '%s' ignored", t);
    }
    return m;
}

static atomic_uint g_mask = ATOMIC_VAR_INIT(0);
static atomic_int g_ready = ATOMIC_VAR_INIT(0);
static atomic_uint g_forced = ATOMIC_VAR_INIT(DM_CPU_DETECT);

unsigned dm_cpu_features(void)
{
    if (!atomic_load(&g_ready)) {
        atomic_store(&g_mask, detect_cpu() & env_mask()); /* idempotent: races store the same */
        atomic_store(&g_ready, 1);
    }
    unsigned m = atomic_load(&g_mask), f = atomic_load(&g_forced);
    return f == DM_CPU_DETECT ? m : f & detect_cpu();
}

void dm_cpu_force_features(unsigned mask) { atomic_store(&g_forced, mask); }

const char *dm_cpu_features_string(unsigned m)
{
    static const char *names[8] = {"generic",          "avx512",          "bf16",
                                   "avx512,bf16",      "vnni",            "avx512,vnni",
                                   "bf16,vnni",        "avx512,bf16,vnni"};
    return names[m & 7u];
}

void dm_cpu_note_fallback(const char *what, unsigned need)
{
    static atomic_uint said = ATOMIC_VAR_INIT(0); /* one bit per `need` mask */
    unsigned bit = 1u << (need & 7u);
    if (atomic_fetch_or(&said, bit) & bit) return;
    unsigned have = detect_cpu();
    dm_log(DM_LOG_INFO, "%s: portable path (needs %s; %s) - slower, same results", what,
           dm_cpu_features_string(need),
           (have & need) == need ? "disabled by DITMOE_CPU_FEATURES or a test"
                                 : "this CPU lacks it");
}
