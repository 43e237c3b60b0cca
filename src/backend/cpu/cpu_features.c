/* Run-time CPU feature detection for the low-precision kernels (lowp.h). The library may be built
 * for a generic x86-64 (DITMOE_NATIVE=OFF) or for another CPU than it runs on, so the AVX512
 * kernels carry their own target attributes and are chosen here, per call, from cpuid (GCC's
 * __builtin_cpu_supports, which also checks that the OS saves the zmm state). */
#include "backend/cpu/lowp.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023 /* Linux >= 5.16: ask for the AMX tile data state */
#define XFEATURE_XTILEDATA 18
#endif

/* AMX needs the kernel to enable the tile state for this process (once, for all threads). */
static int amx_permitted(void)
{
#if defined(__linux__) && defined(__x86_64__)
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return 0;
#endif
}

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
    /* AMX from cpuid leaf 7 EDX (bit 22 AMX-BF16, 24 AMX-TILE, 25 AMX-INT8): clang 14's
     * __builtin_cpu_supports does not know the "amx-*" names (the clang sanitizer build). */
    unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0;
    const int tile = __get_cpuid_count(7, 0, &a7, &b7, &c7, &d7) && (d7 >> 24 & 1);
    if ((m & DM_CPU_AVX512) && tile && (d7 >> 25 & 1)) m |= DM_CPU_AMX_INT8;
    if ((m & DM_CPU_AVX512) && tile && (d7 >> 22 & 1)) m |= DM_CPU_AMX_BF16;
#endif
    return m;
}

/* Detected once: cpuid, then the AMX permission (a system call) only if cpuid offers AMX. */
static unsigned detect_once(void)
{
    static atomic_int done = ATOMIC_VAR_INIT(0);
    static atomic_uint mask = ATOMIC_VAR_INIT(0);
    if (!atomic_load(&done)) {
        unsigned m = detect_cpu();
        if ((m & (DM_CPU_AMX_INT8 | DM_CPU_AMX_BF16)) && !amx_permitted())
            m &= ~(unsigned)(DM_CPU_AMX_INT8 | DM_CPU_AMX_BF16);
        atomic_store(&mask, m); /* racing threads store the same value */
        atomic_store(&done, 1);
    }
    return atomic_load(&mask);
}

unsigned dm_cpu_parse_features(const char *s)
{
    if (!s || !*s || !strcmp(s, "native")) return ~0u;
    if (!strcmp(s, "generic") || !strcmp(s, "none")) return 0;
    unsigned m = 0;
    char buf[128];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (!strcmp(t, "avx512")) m |= DM_CPU_AVX512;
        else if (!strcmp(t, "bf16")) m |= DM_CPU_AVX512 | DM_CPU_AVX512_BF16;
        else if (!strcmp(t, "vnni")) m |= DM_CPU_AVX512 | DM_CPU_AVX512_VNNI;
        else if (!strcmp(t, "amx")) m |= DM_CPU_AVX512 | DM_CPU_AMX_INT8 | DM_CPU_AMX_BF16;
        else dm_log(DM_LOG_INFO, "DITMOE_CPU_FEATURES: unknown feature '%s' ignored", t);
    }
    return m;
}

/* $DITMOE_CPU_FEATURES, read once. */
static unsigned env_mask(void) { return dm_cpu_parse_features(getenv("DITMOE_CPU_FEATURES")); }

static atomic_uint g_mask = ATOMIC_VAR_INIT(0);
static atomic_int g_ready = ATOMIC_VAR_INIT(0);
static atomic_uint g_forced = ATOMIC_VAR_INIT(DM_CPU_DETECT);

unsigned dm_cpu_features(void)
{
    if (!atomic_load(&g_ready)) {
        atomic_store(&g_mask, detect_once() & env_mask()); /* idempotent: races store the same */
        atomic_store(&g_ready, 1);
    }
    unsigned m = atomic_load(&g_mask), f = atomic_load(&g_forced);
    return f == DM_CPU_DETECT ? m : f & detect_once();
}

void dm_cpu_force_features(unsigned mask) { atomic_store(&g_forced, mask); }

const char *dm_cpu_features_string(unsigned m)
{
    static const char *names[] = {"avx512", "bf16", "vnni", "amx-int8", "amx-bf16"};
    static char buf[32][48];
    static atomic_int built = ATOMIC_VAR_INIT(0);
    if (!atomic_load(&built)) { /* every racing builder writes the same bytes before `built` */
        for (unsigned k = 0; k < 32; k++) {
            char t[48] = "generic";
            for (int i = 0, n = 0; i < 5; i++)
                if (k & (1u << i)) {
                    if (n++) strcat(t, ",");
                    else t[0] = 0;
                    strcat(t, names[i]);
                }
            memcpy(buf[k], t, sizeof t);
        }
        atomic_store(&built, 1);
    }
    return buf[m & 31u];
}

void dm_cpu_note_fallback(const char *what, unsigned need)
{
    static atomic_uint said = ATOMIC_VAR_INIT(0); /* one bit per `need` mask */
    unsigned bit = 1u << (need & 31u);
    if (atomic_fetch_or(&said, bit) & bit) return;
    unsigned have = detect_once();
    dm_log(DM_LOG_INFO, "%s: portable path (needs %s; %s) - slower, same bits as the AVX512 kernels", what,
           dm_cpu_features_string(need),
           (have & need) == need ? "disabled by DITMOE_CPU_FEATURES or a test"
                                 : "this CPU lacks it");
}
