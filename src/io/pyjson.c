/* JSON text exactly as Python's json.dumps(obj) writes it (default separators ", " and ": ",
 * ensure_ascii escapes, floats as repr()), so that ditmoe-convert's metadata is byte-identical
 * to tools/convert_checkpoint.py's. cJSON does not tell ints from floats: the converter's float
 * fields (vae_scale, time_scale, cfg_scale) are printed as floats, every other number as an int. */
#include "io/st_internal.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *s;
    size_t n, cap;
    int oom;
} sbuf;

static void put(sbuf *b, const char *s, size_t n)
{
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 256;
        while (nc < b->n + n + 1) nc *= 2;
        char *x = realloc(b->s, nc);
        if (!x) {
            b->oom = 1;
            return;
        }
        b->s = x, b->cap = nc;
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = '\0';
}

static void puts_(sbuf *b, const char *s) { put(b, s, strlen(s)); }

static void py_float(sbuf *b, double v)
{
    char e[40], out[64];
    int p = 1;
    for (; p <= 17; p++) { /* shortest round trip, as repr() */
        snprintf(e, sizeof e, "%.*e", p - 1, v);
        if (strtod(e, NULL) == v) break;
    }
    char *ep = strchr(e, 'e');
    int ex = atoi(ep + 1);
    *ep = '\0';
    char digits[32];
    size_t nd = 0;
    for (const char *q = e; *q; q++)
        if (isdigit((unsigned char)*q)) digits[nd++] = *q;
    digits[nd] = '\0';
    const char *sign = v < 0 ? "-" : "";
    if (ex >= -4 && ex < 16) {
        if (ex >= (int)nd - 1) { /* integral */
            snprintf(out, sizeof out, "%s%s%0*d.0", sign, digits, ex - (int)nd + 1, 0);
            if (ex - (int)nd + 1 == 0) snprintf(out, sizeof out, "%s%s.0", sign, digits);
        } else if (ex >= 0) {
            snprintf(out, sizeof out, "%s%.*s.%s", sign, ex + 1, digits, digits + ex + 1);
        } else {
            snprintf(out, sizeof out, "%s0.%0*d%s", sign, -ex - 1, 0, digits);
            if (-ex - 1 == 0) snprintf(out, sizeof out, "%s0.%s", sign, digits);
        }
    } else {
        snprintf(out, sizeof out, "%s%c%s%s%se%c%02d", sign, digits[0], nd > 1 ? "." : "",
                 digits + 1, "", ex < 0 ? '-' : '+', ex < 0 ? -ex : ex);
    }
    puts_(b, out);
}

static void py_str(sbuf *b, const char *s)
{
    puts_(b, "\"");
    const unsigned char *q = (const unsigned char *)s;
    char u[16];
    while (*q) {
        unsigned c = *q;
        int len = 1;
        if (c >= 0x80) { /* UTF-8 -> code point -> \uXXXX (surrogate pairs above the BMP) */
            len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
            c = len == 4 ? c & 7 : len == 3 ? c & 15 : len == 2 ? c & 31 : 0xFFFD;
            for (int i = 1; i < len; i++) {
                if ((q[i] & 0xC0) != 0x80) {
                    len = i, c = 0xFFFD;
                    break;
                }
                c = (c << 6) | (q[i] & 63);
            }
            if (c >= 0x10000) {
                c -= 0x10000;
                snprintf(u, sizeof u, "\\u%04x\\u%04x", 0xD800 + (c >> 10), 0xDC00 + (c & 1023));
            } else {
                snprintf(u, sizeof u, "\\u%04x", c);
            }
            puts_(b, u);
        } else if (c == '"' || c == '\\') {
            u[0] = '\\', u[1] = (char)c;
            put(b, u, 2);
        } else if (c < 0x20) {
            const char *esc = c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t"
                              : c == '\b' ? "\\b" : c == '\f' ? "\\f" : NULL;
            if (esc) puts_(b, esc);
            else {
                snprintf(u, sizeof u, "\\u%04x", c);
                puts_(b, u);
            }
        } else {
            put(b, (const char *)q, 1);
        }
        q += len;
    }
    puts_(b, "\"");
}

static void py_dump(sbuf *b, const cJSON *j, const char *key)
{
    if (cJSON_IsObject(j) || cJSON_IsArray(j)) {
        int obj = cJSON_IsObject(j);
        puts_(b, obj ? "{" : "[");
        for (const cJSON *c = j->child; c; c = c->next) {
            if (obj) {
                py_str(b, c->string);
                puts_(b, ": ");
            }
            py_dump(b, c, obj ? c->string : key);
            if (c->next) puts_(b, ", ");
        }
        puts_(b, obj ? "}" : "]");
    } else if (cJSON_IsString(j)) {
        py_str(b, j->valuestring);
    } else if (cJSON_IsBool(j)) {
        puts_(b, cJSON_IsTrue(j) ? "true" : "false");
    } else if (cJSON_IsNumber(j)) {
        int is_float = key && (!strcmp(key, "vae_scale") || !strcmp(key, "time_scale") ||
                               !strcmp(key, "cfg_scale"));
        if (is_float) py_float(b, j->valuedouble);
        else {
            char n[32];
            snprintf(n, sizeof n, "%lld", (long long)j->valuedouble);
            puts_(b, n);
        }
    } else {
        puts_(b, "null");
    }
}

char *dm_json_python(const void *json)
{
    sbuf b = {0};
    py_dump(&b, json, NULL);
    if (b.oom || !b.s) {
        free(b.s);
        return NULL;
    }
    return b.s;
}
