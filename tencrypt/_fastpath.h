/* tencrypt._fastpath: what its two C files share (see _fastpath.c for the rules). */
#ifndef TENCRYPT_FASTPATH_H
#define TENCRYPT_FASTPATH_H

#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

/* One packet of a batch: where its bytes are, while the batch's exports hold them. */
typedef struct {
    const unsigned char *buf;
    Py_ssize_t len;
} Piece;

/* The packets of a batch from ``start`` on (core/fastpath.py rule 7): a list or tuple of
 * buffers, one export each; or a core.batch.Rows, one export of its buffer and the pieces
 * computed from its geometry (no Python object per packet). */
typedef struct {
    Py_buffer *exports;
    Py_ssize_t nexports;
    Piece *pieces;
    Py_ssize_t start, count; /* start: clamped to 0 .. the batch's length */
} Pieces;

/* 0, or -1 with an exception set (nothing then to release). */
int fp_get_pieces(PyObject *seq, Py_ssize_t start, Pieces *out);
void fp_release_pieces(Pieces *p);

/* _fastpath_tcp.c: core/batch.py's segmentation and coalescing */
PyObject *fp_segment(PyObject *self, PyObject *args);
PyObject *fp_coalesce(PyObject *self, PyObject *args);

#endif
