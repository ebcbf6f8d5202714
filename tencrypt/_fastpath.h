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
void fp_partial_csum(unsigned char *p, Py_ssize_t len, Py_ssize_t ihl);
#define FP_MAX_RUN 64 /* fp_coalesce_into's bound: the lane's runs (UDP_MAX_SEGMENTS) */
Py_ssize_t fp_coalesce_into(const Piece *bufs, Py_ssize_t n, int partial, Py_ssize_t gap,
                            unsigned char *out, Py_ssize_t *lens, Py_ssize_t *gsos);
void fp_segment_rows(const unsigned char *src, const unsigned char *body, Py_ssize_t ihl,
                     Py_ssize_t thl, Py_ssize_t total, Py_ssize_t mss, unsigned char *buf,
                     Py_ssize_t n, Py_ssize_t stride);

/* _fastpath.c: shared with _lane.c (the express lane) */
#include <openssl/evp.h>
extern EVP_CIPHER *chacha;
typedef struct {
    uint64_t *ring; /* RING native u64 words: the ReplayWindow's own buffer */
    uint64_t top;
    int empty; /* top == -1 in Python: nothing marked yet */
} Window;
void build_header(unsigned char *out, uint32_t index, uint64_t counter);
void build_nonce(unsigned char *nonce, const unsigned char *header);
int seal_into(EVP_CIPHER_CTX *ctx, const unsigned char *key, const unsigned char *nonce,
              const unsigned char *aad, int aad_len, const unsigned char *plain, int len,
              unsigned char *out);
int open_into(EVP_CIPHER_CTX *ctx, const unsigned char *key, const unsigned char *nonce,
              const unsigned char *aad, int aad_len, const unsigned char *sealed, int len,
              unsigned char *plain);
int window_check(const Window *w, uint64_t counter);
void window_update(Window *w, uint64_t counter);
int get_window(PyObject *window, Py_buffer *ring, Window *w);

/* _lane.c: adds the Lane type to the module */
int fp_add_lane(PyObject *module);

#endif
