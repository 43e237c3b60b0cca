/* Contact sheet for CLI programs: a grid of images with 2-px black padding (torchvision's
 * make_grid look) and optional labels under each image in a built-in 3x5 bitmap font. */
#ifndef DM_CLI_COMMON_GRID_H
#define DM_CLI_COMMON_GRID_H

#include "ditmoe.h"

typedef struct {
    int rows, cols, w, h, ch; /* cells, image size, channels (1 or 3) */
    int pad, label_h, scale;  /* padding, label strip height, font scale */
    int gw, gh;               /* sheet size */
    uint8_t *pix;             /* [gh, gw, ch] */
} dm_cli_grid;

/* labelled: reserve a strip under every image for a text label. */
dm_status dm_cli_grid_init(dm_cli_grid *g, int rows, int cols, int w, int h, int ch, int labelled);
/* Place a uint8 [h, w, ch] image and its label (may be NULL; cut to the cell width; letters
 * drawn upper-case). */
void dm_cli_grid_put(dm_cli_grid *g, int row, int col, const uint8_t *hwc, const char *label);
/* Written with dm_image_write (format from the name; quality for JPEG). */
dm_status dm_cli_grid_write(const dm_cli_grid *g, const char *path, int quality,
                            const char *const *text);
void dm_cli_grid_free(dm_cli_grid *g);
/* Draw text at (x, y) (top-left) in colour 255; returns the number of characters drawn. */
int dm_cli_draw_text(uint8_t *pix, int W, int H, int ch, int x, int y, int scale, int max_w,
                     const char *s);

#endif
