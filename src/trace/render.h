/* render.h — internal: a tiny RGB canvas for ditmoe-routes' figures: a 5x7 bitmap font,
 * filled rectangles, the stated colour scales, PNG reading (libpng) for overlays. */
#ifndef DM_TRACE_RENDER_H
#define DM_TRACE_RENDER_H

#include "ditmoe.h"

typedef struct {
    int w, h;
    uint8_t *pix; /* [h, w, 3] */
} dm_canvas;

dm_status dm_canvas_init(dm_canvas *c, int w, int h); /* white */
void dm_canvas_free(dm_canvas *c);
void dm_canvas_rect(dm_canvas *c, int x, int y, int w, int h, const uint8_t rgb[3]);
/* Text in the 5x7 font at integer scale (glyph cell 6x8 * scale); lower case is drawn as upper
 * case, unknown characters as a box. Returns the width drawn. */
int dm_canvas_text(dm_canvas *c, int x, int y, int scale, const char *s, const uint8_t rgb[3]);
int dm_text_width(const char *s, int scale);

/* Diverging scale for a ratio r to uniform (r = P * E, 1 = uniform): log2 r clipped to
 * [-2, 2], blue (1/4x) - white (1x) - red (4x). */
void dm_color_ratio(double r, uint8_t rgb[3]);
/* Distinct colour of expert e (a fixed 16-colour palette, cycled). */
void dm_color_expert(int e, uint8_t rgb[3]);

/* Read a PNG as 8-bit RGB [h, w, 3] (malloc'd). */
dm_status dm_png_read_rgb(const char *path, int *w, int *h, uint8_t **rgb);

#endif
