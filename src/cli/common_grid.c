/* Contact sheet with labels in a 3x5 bitmap font (see common_grid.h). */
#include "common_grid.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

/* 3x5 glyphs: five rows, one octal digit each (4 = left column, 2 = middle, 1 = right). */
static const struct {
    char c;
    const char *rows;
} k_font[] = {
    {'0', "75557"}, {'1', "26227"}, {'2', "71747"}, {'3', "71317"}, {'4', "55711"},
    {'5', "74717"}, {'6', "74757"}, {'7', "71122"}, {'8', "75757"}, {'9', "75717"},
    {'A', "25755"}, {'B', "65656"}, {'C', "34443"}, {'D', "65556"}, {'E', "74647"},
    {'F', "74644"}, {'G', "34553"}, {'H', "55755"}, {'I', "72227"}, {'J', "11152"},
    {'K', "55655"}, {'L', "44447"}, {'M', "57755"}, {'N', "65555"}, {'O', "25552"},
    {'P', "65644"}, {'Q', "25563"}, {'R', "65655"}, {'S', "34216"}, {'T', "72222"},
    {'U', "55557"}, {'V', "55552"}, {'W', "55775"}, {'X', "55255"}, {'Y', "55222"},
    {'Z', "71247"}, {'-', "00700"}, {'/', "11244"}, {'.', "00002"}, {'_', "00007"},
    {' ', "00000"}, {',', "00024"}, {'(', "12221"}, {')', "42224"}, {'\'', "22000"},
    {':', "02020"}, {'+', "02720"}, {'?', "71202"},
};

static const char *glyph(char c)
{
    c = (char)toupper((unsigned char)c);
    for (size_t i = 0; i < sizeof k_font / sizeof k_font[0]; i++)
        if (k_font[i].c == c) return k_font[i].rows;
    return "71202"; /* '?' */
}

int dm_cli_draw_text(uint8_t *pix, int W, int H, int ch, int x, int y, int scale, int max_w,
                     const char *s)
{
    const int adv = 4 * scale;
    int n = 0;
    for (; s && *s && (n + 1) * adv - scale <= max_w; s++, n++) {
        const char *g = glyph(*s);
        for (int r = 0; r < 5; r++) {
            int bits = g[r] - '0';
            for (int col = 0; col < 3; col++) {
                if (!(bits & (4 >> col))) continue;
                for (int dy = 0; dy < scale; dy++)
                    for (int dx = 0; dx < scale; dx++) {
                        int px = x + n * adv + col * scale + dx, py = y + r * scale + dy;
                        if (px < 0 || py < 0 || px >= W || py >= H) continue;
                        memset(pix + ((size_t)py * W + px) * ch, 255, (size_t)ch);
                    }
            }
        }
    }
    return n;
}

dm_status dm_cli_grid_init(dm_cli_grid *g, int rows, int cols, int w, int h, int ch, int labelled)
{
    memset(g, 0, sizeof *g);
    g->rows = rows;
    g->cols = cols;
    g->w = w;
    g->h = h;
    g->ch = ch;
    g->pad = 2;
    g->scale = w >= 96 ? w / 64 : 1;
    g->label_h = labelled ? 7 * g->scale : 0;
    g->gw = cols * (w + g->pad) + g->pad;
    g->gh = rows * (h + g->label_h + g->pad) + g->pad;
    if ((double)g->gw * g->gh * ch > 1.5e9)
        return dm_fail(DM_ERR_ARG, "--grid: sheet of %dx%d pixels is too large", g->gw, g->gh);
    g->pix = calloc((size_t)g->gw * g->gh * ch, 1);
    if (!g->pix) return dm_fail(DM_ERR_NOMEM, "out of memory for a %dx%d grid", g->gw, g->gh);
    return DM_OK;
}

void dm_cli_grid_put(dm_cli_grid *g, int row, int col, const uint8_t *hwc, const char *label)
{
    if (!g->pix || row < 0 || col < 0 || row >= g->rows || col >= g->cols) return;
    const int x0 = g->pad + col * (g->w + g->pad), y0 = g->pad + row * (g->h + g->label_h + g->pad);
    for (int y = 0; y < g->h; y++)
        memcpy(g->pix + ((size_t)(y0 + y) * g->gw + x0) * g->ch, hwc + (size_t)y * g->w * g->ch,
               (size_t)g->w * g->ch);
    if (label && g->label_h)
        dm_cli_draw_text(g->pix, g->gw, g->gh, g->ch, x0, y0 + g->h + g->scale, g->scale, g->w,
                         label);
}

dm_status dm_cli_grid_write(const dm_cli_grid *g, const char *path, int quality,
                            const char *const *text)
{
    return dm_image_write(path, g->gw, g->gh, g->ch, g->pix, quality, text);
}

void dm_cli_grid_free(dm_cli_grid *g)
{
    free(g->pix);
    memset(g, 0, sizeof *g);
}
