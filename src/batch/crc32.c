/* CRC-32 as zip and PNG use it (reflected 0xEDB88320, init/xorout 0xffffffff): a bit-by-bit
 * reference and a slicing-by-8 version (8 table lookups per 8 input bytes). */
#include "batch/batch.h"

#include <pthread.h>

#define POLY 0xEDB88320u

uint32_t dm_crc32_naive(uint32_t crc, const void *data, size_t n)
{
    const uint8_t *p = data;
    crc = ~crc;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int b = 0; b < 8; b++) crc = (crc >> 1) ^ (POLY & (0u - (crc & 1u)));
    }
    return ~crc;
}

static uint32_t T[8][256]; /* T[0]: one byte; T[k][b] = CRC of byte b followed by k zero bytes */
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init_tables(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (POLY & (0u - (c & 1u)));
        T[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; b++)
        for (int k = 1; k < 8; k++) T[k][b] = (T[k - 1][b] >> 8) ^ T[0][T[k - 1][b] & 0xff];
}

uint32_t dm_crc32(uint32_t crc, const void *data, size_t n)
{
    pthread_once(&once, init_tables);
    const uint8_t *p = data;
    crc = ~crc;
    for (; n >= 8; p += 8, n -= 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                             (uint32_t)p[3] << 24);
        crc = T[7][lo & 0xff] ^ T[6][(lo >> 8) & 0xff] ^ T[5][(lo >> 16) & 0xff] ^ T[4][lo >> 24] ^
              T[3][p[4]] ^ T[2][p[5]] ^ T[1][p[6]] ^ T[0][p[7]];
    }
    while (n--) crc = (crc >> 8) ^ T[0][(crc ^ *p++) & 0xff];
    return ~crc;
}
