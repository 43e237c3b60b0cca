/* ImageNet-1k class names (data/imagenet_classes.txt, one a line, compiled into the library by
 * CMake as dm_imagenet_txt): the default class table of 1000-class models, and the hint when a
 * 10-class model is asked for an ImageNet class id. */
#include "io/st_internal.h"

#include <stdlib.h>
#include <string.h>

extern const unsigned char dm_imagenet_txt[];
extern const size_t dm_imagenet_txt_len;

/* Line i of the table as [*s, *s + *n); 0 if there is no such line. */
static int line_at(int i, const char **s, size_t *n)
{
    const char *p = (const char *)dm_imagenet_txt, *end = p + dm_imagenet_txt_len;
    for (int k = 0; p < end; k++) {
        const char *e = memchr(p, '\n', (size_t)(end - p));
        if (!e) e = end;
        if (k == i) {
            *s = p;
            *n = (size_t)(e - p);
            while (*n && (p[*n - 1] == '\r')) (*n)--;
            return 1;
        }
        p = e + 1;
    }
    return 0;
}

const char *dm_imagenet_class(int i)
{
    static _Thread_local char buf[DM_MAX_CLASS_NAME];
    const char *s;
    size_t n;
    if (i < 0 || i >= 1000 || !line_at(i, &s, &n)) return NULL;
    if (n >= sizeof buf) n = sizeof buf - 1;
    memcpy(buf, s, n);
    buf[n] = '\0';
    return buf;
}

dm_status dm_config_default_class_names(dm_config *c)
{
    if (c->num_classes != 1000 || c->class_names) return DM_OK;
    c->class_names = calloc(1000, DM_MAX_CLASS_NAME);
    if (!c->class_names) return dm_fail(DM_ERR_NOMEM, "out of memory (class names)");
    const char *p = (const char *)dm_imagenet_txt, *end = p + dm_imagenet_txt_len;
    for (int k = 0; k < 1000 && p < end; k++) {
        const char *e = memchr(p, '\n', (size_t)(end - p));
        if (!e) e = end;
        size_t n = (size_t)(e - p);
        while (n && p[n - 1] == '\r') n--;
        if (n >= DM_MAX_CLASS_NAME) n = DM_MAX_CLASS_NAME - 1;
        memcpy(c->class_names[k], p, n);
        p = e + 1;
    }
    return DM_OK;
}
