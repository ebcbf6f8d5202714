/* tencrypt._fastpath: what its two C files share (see _fastpath.c for the rules). */
#ifndef TENCRYPT_FASTPATH_H
#define TENCRYPT_FASTPATH_H

#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

/* Export a buffer of every item of ``seq`` from ``start`` on; NULL with an exception set. */
Py_buffer *fp_get_buffers(PyObject *seq, Py_ssize_t start, Py_ssize_t *count);
void fp_release_buffers(Py_buffer *bufs, Py_ssize_t count);

/* _fastpath_tcp.c: core/batch.py's segmentation and coalescing */
PyObject *fp_segment(PyObject *self, PyObject *args);
PyObject *fp_coalesce(PyObject *self, PyObject *args);

#endif
