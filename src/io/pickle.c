/* A restricted pickle reader for torch state dicts. It interprets only the opcodes torch.save
 * emits for tensors, dicts, lists, tuples and scalars, and resolves only an allowlist of globals
 * (tensor / parameter rebuilds, storage types, OrderedDict, argparse.Namespace as an inert
 * object) into data: nothing is ever called or imported, so no code in the file can run.
 * Every read is bounds-checked; any other opcode or global is an error naming it. */
#include "io/pt_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PK_MAX_VALUES (1 << 26)
#define PK_MAX_MEMO (1 << 26)

const char *const dm_pt_dtype_names[PT_NTYPES] = {"float32", "float16", "bfloat16", "float64",
                                                  "int64",   "int32",   "int16",    "int8",
                                                  "uint8",   "bool"};
static const size_t k_dtype_size[PT_NTYPES] = {4, 2, 2, 8, 8, 4, 2, 1, 1, 1};
size_t dm_pt_dtype_size(pt_dtype t) { return (unsigned)t < PT_NTYPES ? k_dtype_size[t] : 0; }

static const struct {
    const char *name;
    int dtype;
} k_storages[] = {{"FloatStorage", PT_F32}, {"HalfStorage", PT_F16},  {"BFloat16Storage", PT_BF16},
                  {"DoubleStorage", PT_F64}, {"LongStorage", PT_I64}, {"IntStorage", PT_I32},
                  {"ShortStorage", PT_I16},  {"CharStorage", PT_I8},  {"ByteStorage", PT_U8},
                  {"BoolStorage", PT_BOOL}};

typedef struct {
    const char *path, *what;
    const uint8_t *b;
    size_t len, pos, op_at;
    int legacy;
    pk_graph *g;
    int *stack;
    int sp, scap;
    int *marks;
    int nmarks, mcap;
    int *memo;
    int nmemo, memcap;
    uint8_t op;
} pk;

#define FAIL(p, ...) pk_fail(p, __VA_ARGS__)

static dm_status __attribute__((format(printf, 2, 3))) pk_fail(pk *p, const char *fmt, ...)
{
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return dm_fail(DM_ERR_FORMAT, "%s: %s: byte %zu: %s", p->path, p->what, p->op_at, msg);
}

static int grow(void **arr, int *cap, int need, size_t elsize)
{
    if (need <= *cap) return 0;
    int nc = *cap ? *cap : 16;
    while (nc < need) nc *= 2;
    void *n = realloc(*arr, (size_t)nc * elsize);
    if (!n) return -1;
    *arr = n;
    *cap = nc;
    return 0;
}

static int new_value(pk *p, pv_kind kind)
{
    pk_graph *g = p->g;
    if (g->nv >= PK_MAX_VALUES) return -1;
    if (grow((void **)&g->v, &g->capv, g->nv + 1, sizeof(pv))) return -1;
    memset(&g->v[g->nv], 0, sizeof(pv));
    g->v[g->nv].kind = kind;
    return g->nv++;
}

static dm_status oom(pk *p) { return dm_fail(DM_ERR_NOMEM, "%s: %s: out of memory", p->path, p->what); }

static dm_status push(pk *p, int v)
{
    if (v < 0) return oom(p);
    if (grow((void **)&p->stack, &p->scap, p->sp + 1, sizeof(int))) return oom(p);
    p->stack[p->sp++] = v;
    return DM_OK;
}

static dm_status pop(pk *p, int *v)
{
    int floor = p->nmarks ? p->marks[p->nmarks - 1] : 0;
    if (p->sp <= floor) return FAIL(p, "opcode 0x%02x: stack underflow", p->op);
    *v = p->stack[--p->sp];
    return DM_OK;
}

static dm_status top(pk *p, int *v)
{
    int floor = p->nmarks ? p->marks[p->nmarks - 1] : 0;
    if (p->sp <= floor) return FAIL(p, "opcode 0x%02x: stack underflow", p->op);
    *v = p->stack[p->sp - 1];
    return DM_OK;
}

/* Pop everything above the topmost mark; [*first, sp) holds it until the next push. */
static dm_status pop_mark(pk *p, int *first)
{
    if (!p->nmarks) return FAIL(p, "opcode 0x%02x: no MARK on the stack", p->op);
    *first = p->marks[--p->nmarks];
    return DM_OK;
}

static dm_status need(pk *p, size_t n, const uint8_t **out)
{
    if (n > p->len - p->pos) return FAIL(p, "truncated (opcode 0x%02x needs %zu more bytes)", p->op, n);
    *out = p->b + p->pos;
    p->pos += n;
    return DM_OK;
}

static uint64_t le(const uint8_t *q, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | q[i];
    return v;
}

static dm_status add_item(pk *p, int coll, int item)
{
    pv *c = &p->g->v[coll];
    if (grow((void **)&c->items, &c->cap, c->n + 1, sizeof(int))) return oom(p);
    c->items[c->n++] = item;
    return DM_OK;
}

static dm_status make_seq(pk *p, pv_kind kind, const int *items, int n)
{
    int t = new_value(p, kind);
    if (t < 0) return oom(p);
    for (int i = 0; i < n; i++)
        if (add_item(p, t, items[i])) return oom(p);
    return push(p, t);
}

static dm_status make_str(pk *p, pv_kind kind, size_t n)
{
    const uint8_t *q = NULL;
    dm_status st = need(p, n, &q);
    if (st) return st;
    int v = new_value(p, kind);
    if (v < 0) return oom(p);
    char *s = malloc(n + 1);
    if (!s) return oom(p);
    memcpy(s, q, n);
    s[n] = '\0';
    p->g->v[v].s = s;
    p->g->v[v].slen = n;
    return push(p, v);
}

static dm_status make_int(pk *p, int64_t i)
{
    int v = new_value(p, PV_INT);
    if (v < 0) return oom(p);
    p->g->v[v].i = i;
    return push(p, v);
}

static dm_status resolve_global(pk *p, const char *mod, const char *name)
{
    int g = -1, dtype = 0;
    if (!strcmp(mod, "collections") && !strcmp(name, "OrderedDict")) g = PG_ORDERED_DICT;
    else if (!strcmp(mod, "torch._utils") && !strcmp(name, "_rebuild_tensor_v2"))
        g = PG_REBUILD_TENSOR_V2;
    else if (!strcmp(mod, "torch._utils") && !strcmp(name, "_rebuild_parameter"))
        g = PG_REBUILD_PARAMETER;
    else if (!strcmp(mod, "argparse") && !strcmp(name, "Namespace")) g = PG_NAMESPACE;
    else if (!strcmp(mod, "torch"))
        for (size_t i = 0; i < sizeof k_storages / sizeof k_storages[0]; i++)
            if (!strcmp(name, k_storages[i].name)) g = PG_STORAGE, dtype = k_storages[i].dtype;
    if (g < 0) { /* printable copies: the names come from the file */
        char m[64], nm[64];
        size_t i;
        for (i = 0; mod[i] && i + 1 < sizeof m; i++) m[i] = mod[i] > 0x20 && mod[i] < 0x7f ? mod[i] : '?';
        m[i] = '\0';
        for (i = 0; name[i] && i + 1 < sizeof nm; i++) nm[i] = name[i] > 0x20 && name[i] < 0x7f ? name[i] : '?';
        nm[i] = '\0';
        mod = m, name = nm;
        return FAIL(p, "forbidden global %s.%s (only tensor/storage rebuilds, OrderedDict and "
                       "argparse.Namespace are allowed; nothing in the file is executed)",
                    mod, name);
    }
    int v = new_value(p, PV_GLOBAL);
    if (v < 0) return oom(p);
    p->g->v[v].g = g;
    p->g->v[v].dtype = dtype;
    return push(p, v);
}

static int is_kind(const pk *p, int v, pv_kind k) { return p->g->v[v].kind == k; }

static dm_status tuple_ints(pk *p, int t, const char *what, int64_t *out, int *n)
{
    const pv *tv = &p->g->v[t];
    if (tv->kind != PV_TUPLE) return FAIL(p, "_rebuild_tensor_v2: %s is not a tuple", what);
    if (tv->n > DM_MAX_DIMS)
        return FAIL(p, "_rebuild_tensor_v2: %s has %d dimensions (at most %d supported)", what,
                    tv->n, DM_MAX_DIMS);
    for (int i = 0; i < tv->n; i++) {
        const pv *e = &p->g->v[tv->items[i]];
        if (e->kind != PV_INT || e->i < 0)
            return FAIL(p, "_rebuild_tensor_v2: %s[%d] is not a non-negative integer", what, i);
        out[i] = e->i;
    }
    *n = tv->n;
    return DM_OK;
}

static dm_status reduce(pk *p)
{
    int args = 0, fn = 0;
    dm_status st;
    if ((st = pop(p, &args)) || (st = pop(p, &fn))) return st;
    if (!is_kind(p, fn, PV_GLOBAL)) return FAIL(p, "REDUCE of a non-callable value");
    if (!is_kind(p, args, PV_TUPLE)) return FAIL(p, "REDUCE with non-tuple arguments");
    const pv *a = &p->g->v[args];
    switch (p->g->v[fn].g) {
    case PG_ORDERED_DICT: {
        if (a->n != 0) return FAIL(p, "collections.OrderedDict called with arguments");
        int d = new_value(p, PV_DICT);
        return d < 0 ? oom(p) : push(p, d);
    }
    case PG_REBUILD_TENSOR_V2: {
        if (a->n != 6 && a->n != 7)
            return FAIL(p, "_rebuild_tensor_v2: %d arguments, expected 6 or 7", a->n);
        int sv = a->items[0], ov = a->items[1];
        if (!is_kind(p, sv, PV_STORAGE))
            return FAIL(p, "_rebuild_tensor_v2: first argument is not a storage");
        if (!is_kind(p, ov, PV_INT) || p->g->v[ov].i < 0)
            return FAIL(p, "_rebuild_tensor_v2: storage offset is not a non-negative integer");
        int t = new_value(p, PV_TENSOR);
        if (t < 0) return oom(p);
        pv *tv = &p->g->v[t];
        a = &p->g->v[args];
        tv->storage = sv;
        tv->dtype = p->g->v[sv].dtype;
        tv->i = p->g->v[ov].i;
        int ns = 0, nt = 0;
        if ((st = tuple_ints(p, a->items[2], "size", tv->shape, &ns)) ||
            (st = tuple_ints(p, a->items[3], "stride", tv->stride, &nt)))
            return st;
        if (ns != nt)
            return FAIL(p, "_rebuild_tensor_v2: size has %d dimensions, stride %d", ns, nt);
        tv->ndim = ns;
        return push(p, t);
    }
    case PG_REBUILD_PARAMETER:
        if (a->n != 3 || !is_kind(p, a->items[0], PV_TENSOR))
            return FAIL(p, "_rebuild_parameter: expected (tensor, requires_grad, hooks)");
        return push(p, a->items[0]);
    case PG_NAMESPACE: {
        int o = new_value(p, PV_OBJECT);
        return o < 0 ? oom(p) : push(p, o);
    }
    default:
        return FAIL(p, "REDUCE: a storage type cannot be called");
    }
}

static dm_status persid(pk *p)
{
    int t = 0;
    dm_status st = pop(p, &t);
    if (st) return st;
    const pv *tv = &p->g->v[t];
    int want = p->legacy ? 6 : 5;
    if (tv->kind != PV_TUPLE || tv->n != want)
        return FAIL(p, "persistent id is not a %d-tuple ('storage', type, key, location, numel%s)",
                    want, p->legacy ? ", view" : "");
    const pv *tag = &p->g->v[tv->items[0]], *ty = &p->g->v[tv->items[1]];
    const pv *key = &p->g->v[tv->items[2]], *num = &p->g->v[tv->items[4]];
    if (tag->kind != PV_STR || strcmp(tag->s, "storage"))
        return FAIL(p, "persistent id is not a storage");
    if (ty->kind != PV_GLOBAL || ty->g != PG_STORAGE)
        return FAIL(p, "persistent id: storage type is not a torch storage class");
    if (key->kind != PV_STR) return FAIL(p, "persistent id: storage key is not a string");
    if (num->kind != PV_INT || num->i < 0)
        return FAIL(p, "persistent id: storage size is not a non-negative integer");
    if (p->legacy && !is_kind(p, tv->items[5], PV_NONE))
        return FAIL(p, "persistent id: storage views (legacy format) are not supported");
    int s = new_value(p, PV_STORAGE);
    if (s < 0) return oom(p);
    pv *sv = &p->g->v[s];
    tv = &p->g->v[t];
    sv->dtype = p->g->v[tv->items[1]].dtype;
    sv->i = p->g->v[tv->items[4]].i;
    if (!(sv->s = strdup(p->g->v[tv->items[2]].s))) return oom(p);
    return push(p, s);
}

static dm_status memo_put(pk *p, uint64_t idx)
{
    int v = 0;
    dm_status st = top(p, &v);
    if (st) return st;
    if (idx >= PK_MAX_MEMO) return FAIL(p, "memo index %llu too large", (unsigned long long)idx);
    if ((int)idx >= p->nmemo) {
        int old = p->memcap;
        if (grow((void **)&p->memo, &p->memcap, (int)idx + 1, sizeof(int))) return oom(p);
        for (int i = old; i < p->memcap; i++) p->memo[i] = 0;
        p->nmemo = (int)idx + 1;
    }
    p->memo[idx] = v;
    return DM_OK;
}

static dm_status memo_get(pk *p, uint64_t idx)
{
    if (idx >= (uint64_t)p->nmemo || !p->memo[idx])
        return FAIL(p, "memo index %llu not defined", (unsigned long long)idx);
    return push(p, p->memo[idx]);
}

static dm_status set_items(pk *p, int first)
{
    int n = p->sp - first;
    if (n % 2) return FAIL(p, "SETITEMS with an odd number of items");
    if (first < 1 || p->sp - n < 1) return FAIL(p, "SETITEMS without a dict");
    int d = p->stack[first - 1];
    if (!is_kind(p, d, PV_DICT)) return FAIL(p, "SETITEM(S) on a non-dict");
    for (int i = first; i < p->sp; i++)
        if (add_item(p, d, p->stack[i])) return oom(p);
    p->sp = first;
    return DM_OK;
}

static dm_status append_items(pk *p, int first)
{
    if (first < 1) return FAIL(p, "APPENDS without a list");
    int l = p->stack[first - 1];
    if (!is_kind(p, l, PV_LIST)) return FAIL(p, "APPEND(S) on a non-list");
    for (int i = first; i < p->sp; i++)
        if (add_item(p, l, p->stack[i])) return oom(p);
    p->sp = first;
    return DM_OK;
}

static dm_status read_line(pk *p, char *buf, size_t cap)
{
    const uint8_t *q = p->b + p->pos, *e = memchr(q, '\n', p->len - p->pos);
    if (!e) return FAIL(p, "GLOBAL: truncated (no newline)");
    size_t n = (size_t)(e - q);
    if (n >= cap) return FAIL(p, "GLOBAL: name longer than %zu bytes", cap - 1);
    memcpy(buf, q, n);
    buf[n] = '\0';
    p->pos += n + 1;
    return DM_OK;
}

static dm_status step(pk *p, int *done)
{
    const uint8_t *q = NULL;
    dm_status st;
    int a = 0, b = 0, first = 0;
    p->op_at = p->pos;
    if ((st = need(p, 1, &q))) return FAIL(p, "truncated (no STOP opcode)");
    p->op = *q;
    switch (p->op) {
    case 0x80: /* PROTO */
        if ((st = need(p, 1, &q))) return st;
        if (*q < 2 || *q > 5) return FAIL(p, "pickle protocol %d not supported (2..5)", *q);
        return DM_OK;
    case 0x95: /* FRAME: a length hint */
        return need(p, 8, &q);
    case '.': /* STOP */
        *done = 1;
        return DM_OK;
    case '(': /* MARK */
        if (grow((void **)&p->marks, &p->mcap, p->nmarks + 1, sizeof(int))) return oom(p);
        p->marks[p->nmarks++] = p->sp;
        return DM_OK;
    case '}': { /* EMPTY_DICT */
        int d = new_value(p, PV_DICT);
        return d < 0 ? oom(p) : push(p, d);
    }
    case ']': { /* EMPTY_LIST */
        int l = new_value(p, PV_LIST);
        return l < 0 ? oom(p) : push(p, l);
    }
    case ')': return make_seq(p, PV_TUPLE, NULL, 0); /* EMPTY_TUPLE */
    case 0x85: case 0x86: case 0x87: { /* TUPLE1..3 */
        int n = p->op - 0x84, it[3];
        for (int i = n - 1; i >= 0; i--)
            if ((st = pop(p, &it[i]))) return st;
        return make_seq(p, PV_TUPLE, it, n);
    }
    case 't': /* TUPLE */
        if ((st = pop_mark(p, &first))) return st;
        {
            int n = p->sp - first;
            p->sp = first;
            return make_seq(p, PV_TUPLE, n ? p->stack + first : NULL, n); /* no NULL + 0 */
        }
    case 'l': /* LIST */
        if ((st = pop_mark(p, &first))) return st;
        {
            int n = p->sp - first;
            p->sp = first;
            return make_seq(p, PV_LIST, n ? p->stack + first : NULL, n);
        }
    case 'X': /* BINUNICODE */
        if ((st = need(p, 4, &q))) return st;
        return make_str(p, PV_STR, (size_t)le(q, 4));
    case 0x8c: /* SHORT_BINUNICODE */
        if ((st = need(p, 1, &q))) return st;
        return make_str(p, PV_STR, *q);
    case 0x8d: /* BINUNICODE8 */
        if ((st = need(p, 8, &q))) return st;
        return make_str(p, PV_STR, (size_t)le(q, 8));
    case 'B': /* BINBYTES */
        if ((st = need(p, 4, &q))) return st;
        return make_str(p, PV_BYTES, (size_t)le(q, 4));
    case 'C': /* SHORT_BINBYTES */
        if ((st = need(p, 1, &q))) return st;
        return make_str(p, PV_BYTES, *q);
    case 'q': /* BINPUT */
        if ((st = need(p, 1, &q))) return st;
        return memo_put(p, *q);
    case 'r': /* LONG_BINPUT */
        if ((st = need(p, 4, &q))) return st;
        return memo_put(p, le(q, 4));
    case 0x94: /* MEMOIZE */
        return memo_put(p, (uint64_t)p->nmemo);
    case 'h': /* BINGET */
        if ((st = need(p, 1, &q))) return st;
        return memo_get(p, *q);
    case 'j': /* LONG_BINGET */
        if ((st = need(p, 4, &q))) return st;
        return memo_get(p, le(q, 4));
    case 'c': { /* GLOBAL */
        char mod[128], name[128];
        if ((st = read_line(p, mod, sizeof mod)) || (st = read_line(p, name, sizeof name)))
            return st;
        return resolve_global(p, mod, name);
    }
    case 0x93: /* STACK_GLOBAL */
        if ((st = pop(p, &b)) || (st = pop(p, &a))) return st;
        if (!is_kind(p, a, PV_STR) || !is_kind(p, b, PV_STR))
            return FAIL(p, "STACK_GLOBAL: module and name must be strings");
        return resolve_global(p, p->g->v[a].s, p->g->v[b].s);
    case 'K': /* BININT1 */
        if ((st = need(p, 1, &q))) return st;
        return make_int(p, *q);
    case 'M': /* BININT2 */
        if ((st = need(p, 2, &q))) return st;
        return make_int(p, (int64_t)le(q, 2));
    case 'J': /* BININT */
        if ((st = need(p, 4, &q))) return st;
        return make_int(p, (int32_t)(uint32_t)le(q, 4));
    case 0x8a: { /* LONG1: little-endian two's complement, n bytes */
        if ((st = need(p, 1, &q))) return st;
        int n = *q;
        if ((st = need(p, (size_t)n, &q))) return st;
        if (n > 8) { /* too large for int64: kept as a float-free placeholder (never a shape) */
            int v = new_value(p, PV_OBJECT);
            return v < 0 ? oom(p) : push(p, v);
        }
        uint64_t u = n ? le(q, n) : 0;
        if (n && n < 8 && (q[n - 1] & 0x80)) u |= ~(uint64_t)0 << (8 * n);
        return make_int(p, (int64_t)u);
    }
    case 'G': { /* BINFLOAT: big-endian double */
        if ((st = need(p, 8, &q))) return st;
        uint64_t u = 0;
        for (int i = 0; i < 8; i++) u = (u << 8) | q[i];
        int v = new_value(p, PV_FLOAT);
        if (v < 0) return oom(p);
        memcpy(&p->g->v[v].f, &u, 8);
        return push(p, v);
    }
    case 'N': return push(p, new_value(p, PV_NONE));
    case 0x88: case 0x89: { /* NEWTRUE, NEWFALSE */
        int v = new_value(p, PV_BOOL);
        if (v < 0) return oom(p);
        p->g->v[v].i = p->op == 0x88;
        return push(p, v);
    }
    case 'Q': return persid(p); /* BINPERSID */
    case 'R': return reduce(p);
    case 0x81: /* NEWOBJ: cls.__new__(cls, *args), allowed for argparse.Namespace only */
        if ((st = pop(p, &b)) || (st = pop(p, &a))) return st;
        if (!is_kind(p, a, PV_GLOBAL) || p->g->v[a].g != PG_NAMESPACE)
            return FAIL(p, "NEWOBJ of something other than argparse.Namespace");
        return push(p, new_value(p, PV_OBJECT));
    case 'b': /* BUILD: state of an OrderedDict (its _metadata) or a Namespace, dropped */
        if ((st = pop(p, &b)) || (st = top(p, &a))) return st;
        if (!is_kind(p, a, PV_DICT) && !is_kind(p, a, PV_OBJECT) && !is_kind(p, a, PV_TENSOR))
            return FAIL(p, "BUILD on a value that is not a dict, tensor or Namespace");
        return DM_OK;
    case 's': /* SETITEM */
        if (p->sp - (p->nmarks ? p->marks[p->nmarks - 1] : 0) < 3)
            return FAIL(p, "SETITEM: stack underflow");
        return set_items(p, p->sp - 2);
    case 'u': /* SETITEMS */
        if ((st = pop_mark(p, &first))) return st;
        return set_items(p, first);
    case 'a': /* APPEND */
        if (p->sp - (p->nmarks ? p->marks[p->nmarks - 1] : 0) < 2)
            return FAIL(p, "APPEND: stack underflow");
        return append_items(p, p->sp - 1);
    case 'e': /* APPENDS */
        if ((st = pop_mark(p, &first))) return st;
        return append_items(p, first);
    case '0': return pop(p, &a); /* POP */
    case '1': /* POP_MARK */
        if ((st = pop_mark(p, &first))) return st;
        p->sp = first;
        return DM_OK;
    case '2': /* DUP */
        if ((st = top(p, &a))) return st;
        return push(p, a);
    default:
        return FAIL(p, "unsupported pickle opcode 0x%02x (not used by torch state dicts)", p->op);
    }
}

dm_status dm_pickle_load(const char *path, const char *what, const uint8_t *buf, size_t len,
                         int legacy, pk_graph *g, size_t *used)
{
    memset(g, 0, sizeof *g);
    pk p = {.path = path, .what = what, .b = buf, .len = len, .legacy = legacy, .g = g};
    dm_status st = DM_OK;
    if (new_value(&p, PV_NONE) < 0) st = oom(&p); /* index 0: "no value" */
    int done = 0;
    while (st == DM_OK && !done) st = step(&p, &done);
    if (st == DM_OK && (p.sp != 1 || p.nmarks))
        st = pk_fail(&p, "STOP with %d values on the stack (expected 1)", p.sp);
    if (st == DM_OK) g->root = p.stack[0];
    if (used) *used = p.pos;
    free(p.stack);
    free(p.marks);
    free(p.memo);
    if (st != DM_OK) dm_pickle_free(g);
    return st;
}

void dm_pickle_free(pk_graph *g)
{
    for (int i = 0; i < g->nv; i++) {
        free(g->v[i].s);
        free(g->v[i].items);
    }
    free(g->v);
    memset(g, 0, sizeof *g);
}

int dm_pickle_dict_get(const pk_graph *g, int d, const char *key)
{
    const pv *dv = &g->v[d];
    if (dv->kind != PV_DICT) return 0;
    int found = 0;
    for (int i = 0; i + 1 < dv->n; i += 2) { /* the last assignment wins, as in Python */
        const pv *k = &g->v[dv->items[i]];
        if (k->kind == PV_STR && !strcmp(k->s, key)) found = dv->items[i + 1];
    }
    return found;
}
