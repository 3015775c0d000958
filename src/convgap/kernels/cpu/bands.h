/* How the fused kernels walk their output: each of nt threads takes a contiguous range of
 * the N x OH output rows (image-major), in bands of at most TH rows within one image, and
 * keeps a window of the input rows those bands need, sliding it down the image so that each
 * input row is computed once per image and range. */
#ifndef CONVGAP_BANDS_H
#define CONVGAP_BANDS_H

typedef struct {
    long g, end;    /* the next output row of this thread's range, and the range's end */
    int cur;        /* the window's image (-1: none yet) */
    int lo, hi;     /* the window: input rows [lo, hi) of image cur */
} Walk;

static inline Walk walk_start(long total, int t, int nt)
{
    Walk w = {total * t / nt, total * (t + 1) / nt, -1, 0, 0};
    return w;
}

/* The next band: image *n, first row *oh, *th rows; 0 once the range is done. */
static inline int next_band(Walk *w, int OH, int TH, int *n, int *oh, int *th)
{
    if (w->g >= w->end) return 0;
    *n = (int)(w->g / OH);
    *oh = (int)(w->g % OH);
    *th = OH - *oh < TH ? OH - *oh : TH;
    if (w->end - w->g < *th) *th = (int)(w->end - w->g);
    w->g += *th;
    return 1;
}

/* Start image n's window at row lo. Returns the rows to drop from its front: the caller
 * moves the kept rows (w->hi - w->lo of them, now starting at lo) to the front of its
 * buffer. A new image, or a window with nothing to keep, restarts empty at lo (0). */
static inline int slide(Walk *w, int n, int lo)
{
    if (n != w->cur || w->hi <= lo) {
        w->cur = n;
        w->lo = w->hi = lo;
        return 0;
    }
    int drop = lo > w->lo ? lo - w->lo : 0;
    w->lo += drop;
    return drop;
}

/* Each thread's share of a kernel's scratch (scratch_floats), rounded up to whole cache
 * lines: the buffer starts 64-byte aligned (torch's allocator), so each share does too, and
 * no two threads write one line. No kernel reads or writes past its share (the slack its
 * buffers need is in their sizes: planar.c's SLACK): tests/test_cpu_kernels.py runs each
 * with its scratch ending at an unmapped page. */
#define LINE_FLOATS 16
static inline long whole_lines(long floats)
{
    return (floats + LINE_FLOATS - 1) / LINE_FLOATS * LINE_FLOATS;
}
#endif
