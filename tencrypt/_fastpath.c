/* tencrypt._fastpath: the data path's loops in C, one call per batch.
 *
 * tencrypt/core/fastpath.py is the specification: the same two functions, the same
 * arguments, the same bytes, counts and replay state (tests/unit/test_fastpath.py runs both
 * and compares them). Read its rules first; this file only says how.
 *
 *  - ChaCha20-Poly1305 (RFC 8439) from the system's libcrypto (EVP), fetched once at import.
 *  - Each call takes the Python buffers it needs (Py_buffer exports keep them alive and
 *    unresizable), then releases the GIL for the whole loop: sealing and opening of one
 *    batch run while the other thread (or the event loop) holds the interpreter.
 *  - Bad input from the network never raises: it is a count. Only misuse by the caller
 *    (wrong key size, an index, counter or limit outside its field, a replay ring of the
 *    wrong shape, a batch that is neither buffers nor a Rows) or a failing libcrypto raises,
 *    the same exception as the pure twin. Every size is checked before any arithmetic on
 *    it, and every int argument converted with its range checked (never a silent wrap).
 *  - The limited API of Python 3.11 (abi3): one build serves every later CPython.
 *  - This file: the AEAD loops and the module; _fastpath_tcp.c: segmentation and coalescing;
 *    _lane.c: the express lane (core/express.py), which shares the AEAD and window helpers.
 */
#include "_fastpath.h"

#include <limits.h>

#include <openssl/err.h>
#include <openssl/evp.h>

#define KEY_LEN 32
#define HEADER_LEN 16
#define TAG_LEN 16
#define OVERHEAD (HEADER_LEN + TAG_LEN)
#define TYPE_DATA 4u
#define WINDOW 4096u /* core/replay.py WINDOW */
#define RING 128u    /* core/replay.py _RING: blocks of 64 counters */

/* the order of core/fastpath.py COUNTS */
enum { AUTHENTICATED, KEEPALIVES, EXPIRED, REPLAY, BAD_TAG, NOT_IPV4, BAD_SOURCE, BYTES_OPENED,
       NCOUNTS };

EVP_CIPHER *chacha; /* owned: EVP_CIPHER_fetch once, not an implicit fetch per init */

static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_le64(const unsigned char *p) {
    return (uint64_t)get_le32(p) | (uint64_t)get_le32(p + 4) << 32;
}

/* An int argument within [0, max] into ``out``: 0, or -1 with TypeError (not an int) or
 * ValueError (negative or above max), as core/fastpath.py raises them. */
static int get_uint(PyObject *obj, unsigned long long max, unsigned long long *out,
                    const char *what) {
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: an int", what);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* OverflowError: negative, or beyond 64 bits */
    } else if (v <= max) {
        *out = v;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "%s: out of range", what);
    return -1;
}

/* open_batch's ``start``: any int, clamped at 0 (fp_get_pieces clamps it at the end). */
static int get_start(PyObject *obj, Py_ssize_t *out) {
    if (!PyLong_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "open_batch: start is an int");
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = overflow > 0 ? PY_SSIZE_T_MAX : overflow < 0 || v < 0 ? 0 : (Py_ssize_t)v;
    return 0;
}

/* Pieces of a core.batch.Rows: its ``geometry`` (buf, stride, size, count, last), checked
 * as Rows.__init__ checks it (misuse raises ValueError). */
static int get_rows(PyObject *geometry, Py_ssize_t start, Pieces *out) {
    Py_ssize_t stride, size, count, last;
    out->exports = PyMem_Calloc(1, sizeof(Py_buffer));
    if (out->exports == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (!PyArg_ParseTuple(geometry, "y*nnnn:Rows.geometry", &out->exports[0], &stride, &size,
                          &count, &last)) {
        PyMem_Free(out->exports);
        return -1;
    }
    out->nexports = 1;
    const unsigned char *buf = out->exports[0].buf;
    /* A zero stride holds one packet at most: otherwise the count is bounded by nothing and
     * the pieces below would be as many as it says (a 32 GB calloc for 2**31 of them). */
    if (count < 0 || last < 0 || last > size || size > stride || stride > out->exports[0].len
        || (stride == 0 && count > 1)
        || (count > 0 && (count - 1 > (PY_SSIZE_T_MAX - last) / (stride ? stride : 1)
                          || (count - 1) * stride + last > out->exports[0].len))) {
        PyErr_SetString(PyExc_ValueError, "Rows: geometry out of range");
        fp_release_pieces(out);
        return -1;
    }
    if (start > count) start = count;
    out->start = start;
    out->count = count - start;
    out->pieces = PyMem_Calloc(out->count ? (size_t)out->count : 1, sizeof(Piece));
    if (out->pieces == NULL) {
        fp_release_pieces(out);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < out->count; i++) {
        out->pieces[i].buf = buf + (start + i) * stride;
        out->pieces[i].len = start + i == count - 1 ? last : size;
    }
    return 0;
}

int fp_get_pieces(PyObject *seq, Py_ssize_t start, Pieces *out) {
    memset(out, 0, sizeof(*out));
    if (start < 0) start = 0;
    if (!PyList_Check(seq) && !PyTuple_Check(seq) && PyObject_HasAttrString(seq, "geometry")) {
        PyObject *geometry = PyObject_GetAttrString(seq, "geometry");
        if (geometry == NULL) return -1;
        int r = get_rows(geometry, start, out);
        Py_DECREF(geometry);
        return r;
    }
    Py_ssize_t n = PySequence_Size(seq);
    if (n < 0) return -1;
    if (start > n) start = n;
    out->start = start;
    Py_ssize_t k = n - start;
    out->exports = PyMem_Calloc(k ? (size_t)k : 1, sizeof(Py_buffer));
    out->pieces = PyMem_Calloc(k ? (size_t)k : 1, sizeof(Piece));
    if (out->exports == NULL || out->pieces == NULL) {
        fp_release_pieces(out);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *item = PySequence_GetItem(seq, start + i);
        int failed = item == NULL || PyObject_GetBuffer(item, &out->exports[i], PyBUF_SIMPLE) < 0;
        Py_XDECREF(item);
        if (failed) {
            fp_release_pieces(out);
            return -1;
        }
        out->nexports = i + 1;
        out->pieces[i].buf = out->exports[i].buf;
        out->pieces[i].len = out->exports[i].len;
    }
    out->count = k;
    return 0;
}

void fp_release_pieces(Pieces *p) {
    for (Py_ssize_t i = 0; i < p->nexports; i++) PyBuffer_Release(&p->exports[i]);
    PyMem_Free(p->exports);
    PyMem_Free(p->pieces);
    memset(p, 0, sizeof(*p));
}

void build_header(unsigned char *out, uint32_t index, uint64_t counter) {
    put_le32(out, TYPE_DATA);
    put_le32(out + 4, index);
    put_le64(out + 8, counter);
}

/* The nonce of a data message: 4 zero bytes || the header's counter (bytes 8..16). */
void build_nonce(unsigned char *nonce, const unsigned char *header) {
    memset(nonce, 0, 4);
    memcpy(nonce + 4, header + 8, 8);
}

/* RFC 8439 §2.8 AEAD_CHACHA20_POLY1305: ``out`` gets the ciphertext then the tag. ``key`` is
 * NULL when the context already holds it: only the nonce changes (measured: setting the key
 * again per message costs about a third of sealing a 1440-byte packet). */
int seal_into(EVP_CIPHER_CTX *ctx, const unsigned char *key, const unsigned char *nonce,
                     const unsigned char *aad, int aad_len, const unsigned char *plain, int len,
                     unsigned char *out) {
    int outl = 0;
    return EVP_EncryptInit_ex(ctx, NULL, NULL, key, nonce)
           && EVP_EncryptUpdate(ctx, NULL, &outl, aad, aad_len)
           && EVP_EncryptUpdate(ctx, out, &outl, plain, len)
           && EVP_EncryptFinal_ex(ctx, out + outl, &outl)
           && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, out + len);
}

/* The inverse: 1 when the tag verified (``plain`` holds ``len - 16`` bytes), 0 when it did
 * not, -1 when libcrypto itself failed. */
int open_into(EVP_CIPHER_CTX *ctx, const unsigned char *key, const unsigned char *nonce,
                     const unsigned char *aad, int aad_len, const unsigned char *sealed, int len,
                     unsigned char *plain) {
    int n = len - TAG_LEN, outl = 0;
    unsigned char tag[TAG_LEN];
    memcpy(tag, sealed + n, TAG_LEN);
    if (!(EVP_DecryptInit_ex(ctx, NULL, NULL, key, nonce)
          && EVP_DecryptUpdate(ctx, NULL, &outl, aad, aad_len)
          && EVP_DecryptUpdate(ctx, plain, &outl, sealed, n)
          && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, tag)))
        return -1;
    if (EVP_DecryptFinal_ex(ctx, plain + outl, &outl) <= 0) {
        ERR_clear_error();
        return 0;
    }
    return 1;
}

/* ---- seal_batch ------------------------------------------------------------------------ */

static PyObject *seal_batch(PyObject *self, PyObject *args) {
    const unsigned char *key;
    Py_ssize_t key_len;
    unsigned long long index, counter;
    PyObject *index_obj, *counter_obj, *packets;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#OOO:seal_batch", &key, &key_len, &index_obj, &counter_obj,
                          &packets))
        return NULL;
    if (key_len != KEY_LEN) {
        PyErr_SetString(PyExc_ValueError, "seal_batch: a 32-byte key");
        return NULL;
    }
    if (get_uint(index_obj, 0xFFFFFFFFull, &index, "seal_batch: receiver_index") < 0
        || get_uint(counter_obj, UINT64_MAX, &counter, "seal_batch: counter") < 0)
        return NULL;
    Pieces batch;
    if (fp_get_pieces(packets, 0, &batch) < 0) return NULL;
    const Piece *bufs = batch.pieces;
    Py_ssize_t count = batch.count, total = 0;
    if (count > 0 && (uint64_t)(count - 1) > UINT64_MAX - counter) {
        /* the last nonce would wrap around to counter 0: a nonce twice under one key */
        fp_release_pieces(&batch);
        PyErr_SetString(PyExc_ValueError, "seal_batch: counter + len(packets) > 2**64");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (bufs[i].len > INT_MAX - OVERHEAD || total > PY_SSIZE_T_MAX - bufs[i].len - OVERHEAD) {
            fp_release_pieces(&batch);
            PyErr_SetString(PyExc_OverflowError, "seal_batch: packet too large");
            return NULL;
        }
        total += bufs[i].len + OVERHEAD;
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL) {
        fp_release_pieces(&batch);
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AsString(result);
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    ok = ctx != NULL && EVP_EncryptInit_ex(ctx, chacha, NULL, key, NULL);
    unsigned char nonce[12];
    for (Py_ssize_t i = 0; ok && i < count; i++) {
        int len = (int)bufs[i].len;
        build_header(out, (uint32_t)index, (uint64_t)counter + (uint64_t)i);
        build_nonce(nonce, out);
        ok = seal_into(ctx, NULL, nonce, out, HEADER_LEN, bufs[i].buf, len, out + HEADER_LEN);
        out += HEADER_LEN + len + TAG_LEN;
    }
    if (!ok) ERR_clear_error();
    EVP_CIPHER_CTX_free(ctx);
    Py_END_ALLOW_THREADS
    fp_release_pieces(&batch);
    if (!ok) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_RuntimeError, "seal_batch: libcrypto failed");
        return NULL;
    }
    return result;
}

/* ---- the replay window: core/replay.py, word for word ------------------------------------ */

/* Window: _fastpath.h */

int window_check(const Window *w, uint64_t counter) {
    if (w->empty || counter > w->top) return 1;
    if (w->top - counter >= WINDOW) return 0;
    return !((w->ring[(counter >> 6) & (RING - 1)] >> (counter & 63)) & 1);
}

void window_update(Window *w, uint64_t counter) {
    if (w->empty || counter > w->top) {
        uint64_t block = counter >> 6;
        /* Python's top >> 6 is -1 for top == -1: the gap is then block + 1 */
        uint64_t gap = w->empty ? block + 1 : block - (w->top >> 6);
        if (gap == 1) {
            w->ring[block & (RING - 1)] = 0;
        } else if (gap >= RING) {
            memset(w->ring, 0, RING * sizeof(uint64_t));
        } else if (gap) {
            for (uint64_t b = block - gap + 1; b <= block; b++) w->ring[b & (RING - 1)] = 0;
        }
        w->top = counter;
        w->empty = 0;
        w->ring[block & (RING - 1)] |= (uint64_t)1 << (counter & 63);
    } else if (w->top - counter < WINDOW) {
        w->ring[(counter >> 6) & (RING - 1)] |= (uint64_t)1 << (counter & 63);
    }
}

/* ---- open_batch ------------------------------------------------------------------------ */

typedef struct {
    Py_ssize_t offset, len; /* an accepted packet in the scratch buffer */
} Span;

/* Whether the ``width``-byte address at ``src`` is one of ``allowed`` (addresses back to
 * back; a shorter tail is ignored). */
static int source_allowed(const unsigned char *src, const unsigned char *allowed,
                          Py_ssize_t allowed_len, Py_ssize_t width) {
    for (Py_ssize_t i = 0; i + width <= allowed_len; i += width)
        if (memcmp(src, allowed + i, (size_t)width) == 0) return 1;
    return 0;
}

/* The sources open_batch accepts: 4-byte IPv4 and 16-byte IPv6 addresses. */
typedef struct {
    const unsigned char *v4, *v6;
    Py_ssize_t v4_len, v6_len;
} Sources;

/* One message of the session (rule 2's stages); returns 0 when libcrypto itself failed. */
static int open_one(EVP_CIPHER_CTX *ctx, const unsigned char *key, const unsigned char *msg,
                    Py_ssize_t len, uint64_t limit, Window *w, const Sources *sources,
                    unsigned char *plain, Py_ssize_t *accepted, Py_ssize_t *counts) {
    uint64_t counter = get_le64(msg + 8);
    *accepted = -1;
    if (counter >= limit) {
        counts[EXPIRED]++;
        return 1;
    }
    if (!window_check(w, counter)) {
        counts[REPLAY]++;
        return 1;
    }
    int n = (int)(len - OVERHEAD);
    unsigned char nonce[12];
    build_nonce(nonce, msg);
    int verified = open_into(ctx, key, nonce, msg, HEADER_LEN, msg + HEADER_LEN,
                             (int)(len - HEADER_LEN), plain);
    if (verified < 0) return 0;
    if (!verified) {
        counts[BAD_TAG]++;
        return 1;
    }
    window_update(w, counter);
    counts[AUTHENTICATED]++;
    int allowed;
    if (n == 0) {
        counts[KEEPALIVES]++;
        return 1;
    }
    if (n >= 20 && plain[0] >= 0x45 && plain[0] <= 0x4F && (plain[2] << 8 | plain[3]) == n) {
        allowed = source_allowed(plain + 12, sources->v4, sources->v4_len, 4);
    } else if (n >= 40 && plain[0] >> 4 == 6 && 40 + (plain[4] << 8 | plain[5]) == n) {
        allowed = source_allowed(plain + 8, sources->v6, sources->v6_len, 16);
    } else {
        counts[NOT_IPV4]++; /* not an IP packet: core/fastpath.py NOT_IP */
        return 1;
    }
    if (!allowed) {
        counts[BAD_SOURCE]++;
    } else {
        counts[BYTES_OPENED] += n;
        *accepted = n;
    }
    return 1;
}

/* The ReplayWindow's ring (writable, RING u64 words) and top. */
int get_window(PyObject *window, Py_buffer *ring, Window *w) {
    PyObject *ring_obj = PyObject_GetAttrString(window, "ring");
    if (ring_obj == NULL) return -1;
    int failed = PyObject_GetBuffer(ring_obj, ring, PyBUF_WRITABLE) < 0;
    Py_DECREF(ring_obj);
    if (failed) return -1;
    if (ring->len != (Py_ssize_t)(RING * sizeof(uint64_t))) {
        PyBuffer_Release(ring);
        PyErr_SetString(PyExc_ValueError, "open_batch: the replay ring is 128 u64 words");
        return -1;
    }
    PyObject *top = PyObject_GetAttrString(window, "top");
    if (top == NULL) {
        PyBuffer_Release(ring);
        return -1;
    }
    long long signed_top = PyLong_AsLongLongAndOverflow(top, &failed);
    w->empty = !failed && signed_top < 0;
    w->top = w->empty ? 0 : PyLong_AsUnsignedLongLong(top);
    Py_DECREF(top);
    if (PyErr_Occurred()) {
        PyBuffer_Release(ring);
        return -1;
    }
    w->ring = (uint64_t *)ring->buf;
    return 0;
}

static PyObject *build_result(Py_ssize_t stop, const unsigned char *scratch, const Span *spans,
                              Py_ssize_t accepted, const Py_ssize_t *counts) {
    PyObject *list = PyList_New(accepted);
    PyObject *tuple = PyTuple_New(NCOUNTS);
    if (list == NULL || tuple == NULL) goto fail;
    for (Py_ssize_t i = 0; i < accepted; i++) {
        PyObject *packet = PyBytes_FromStringAndSize((const char *)scratch + spans[i].offset,
                                                     spans[i].len);
        if (packet == NULL || PyList_SetItem(list, i, packet) < 0) goto fail;
    }
    for (int i = 0; i < NCOUNTS; i++) {
        PyObject *v = PyLong_FromSsize_t(counts[i]);
        if (v == NULL || PyTuple_SetItem(tuple, i, v) < 0) goto fail;
    }
    return Py_BuildValue("nNN", stop, list, tuple);
fail:
    Py_XDECREF(list);
    Py_XDECREF(tuple);
    return NULL;
}

static PyObject *open_batch(PyObject *self, PyObject *args) {
    const unsigned char *key;
    Py_ssize_t key_len, start;
    unsigned long long index, limit;
    PyObject *index_obj, *limit_obj, *window_obj, *datagrams, *start_obj;
    Sources sources = {NULL, (const unsigned char *)"", 0, 0}; /* allowed6 is optional */
    (void)self;
    if (!PyArg_ParseTuple(args, "y#OOOy#OO|y#:open_batch", &key, &key_len, &index_obj,
                          &limit_obj, &window_obj, &sources.v4, &sources.v4_len, &datagrams,
                          &start_obj, &sources.v6, &sources.v6_len))
        return NULL;
    if (key_len != KEY_LEN) {
        PyErr_SetString(PyExc_ValueError, "open_batch: a 32-byte key");
        return NULL;
    }
    if (get_uint(index_obj, 0xFFFFFFFFull, &index, "open_batch: receiver_index") < 0
        || get_uint(limit_obj, UINT64_MAX, &limit, "open_batch: limit") < 0
        || get_start(start_obj, &start) < 0)
        return NULL;
    Py_buffer ring;
    Window w;
    if (get_window(window_obj, &ring, &w) < 0) return NULL;
    Pieces batch;
    if (fp_get_pieces(datagrams, start, &batch) < 0) {
        PyBuffer_Release(&ring);
        return NULL;
    }
    const Piece *bufs = batch.pieces;
    Py_ssize_t first = batch.start, count = batch.count;
    Py_ssize_t scratch_len = 1;
    for (Py_ssize_t i = 0; i < count; i++) scratch_len += bufs[i].len;
    unsigned char *scratch = PyMem_Malloc((size_t)scratch_len);
    Span *spans = PyMem_Malloc((size_t)(count ? count : 1) * sizeof(Span));
    Py_ssize_t counts[NCOUNTS] = {0}, accepted = 0, used = 0, i = 0;
    int ok = scratch != NULL && spans != NULL;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        ok = ctx != NULL && EVP_DecryptInit_ex(ctx, chacha, NULL, key, NULL);
        for (; ok && i < count; i++) {
            const unsigned char *msg = bufs[i].buf;
            Py_ssize_t len = bufs[i].len, n = -1;
            if (len < OVERHEAD || len > INT_MAX || get_le32(msg) != TYPE_DATA
                || get_le32(msg + 4) != (uint32_t)index)
                break; /* not this session's: the caller's */
            ok = open_one(ctx, NULL, msg, len, (uint64_t)limit, &w, &sources, scratch + used, &n,
                          counts);
            if (ok && n >= 0) {
                spans[accepted].offset = used;
                spans[accepted].len = n;
                accepted++;
                used += n;
            }
        }
        if (!ok) ERR_clear_error();
        EVP_CIPHER_CTX_free(ctx);
        Py_END_ALLOW_THREADS
    }
    fp_release_pieces(&batch);
    PyBuffer_Release(&ring);
    PyObject *result = NULL;
    if (scratch == NULL || spans == NULL) {
        PyErr_NoMemory();
    } else if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "open_batch: libcrypto failed");
    } else {
        PyObject *top = w.empty ? PyLong_FromLong(-1) : PyLong_FromUnsignedLongLong(w.top);
        if (top != NULL && PyObject_SetAttrString(window_obj, "top", top) == 0)
            result = build_result(first + i, scratch, spans, accepted, counts);
        Py_XDECREF(top);
    }
    PyMem_Free(scratch);
    PyMem_Free(spans);
    return result;
}

/* ---- one message, any nonce and associated data: for the RFC 8439 vectors ------------- */

static PyObject *aead(PyObject *args, int encrypt) {
    const unsigned char *key, *nonce, *aad, *data;
    Py_ssize_t key_len, nonce_len, aad_len, data_len;
    if (!PyArg_ParseTuple(args, "y#y#y#y#", &key, &key_len, &nonce, &nonce_len, &aad, &aad_len,
                          &data, &data_len))
        return NULL;
    if (key_len != KEY_LEN || nonce_len != 12 || aad_len > INT_MAX || data_len > INT_MAX - TAG_LEN
        || (!encrypt && data_len < TAG_LEN)) {
        PyErr_SetString(PyExc_ValueError, "a 32-byte key, a 12-byte nonce, a tag to open");
        return NULL;
    }
    Py_ssize_t out_len = encrypt ? data_len + TAG_LEN : data_len - TAG_LEN;
    unsigned char *out = PyMem_Malloc((size_t)out_len + 1);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int r = out != NULL && ctx != NULL && EVP_CipherInit_ex(ctx, chacha, NULL, NULL, NULL, encrypt);
    if (r) {
        r = encrypt ? seal_into(ctx, key, nonce, aad, (int)aad_len, data, (int)data_len, out)
                    : open_into(ctx, key, nonce, aad, (int)aad_len, data, (int)data_len, out);
    } else {
        r = -1;
    }
    EVP_CIPHER_CTX_free(ctx);
    PyObject *result;
    if (r > 0) {
        result = PyBytes_FromStringAndSize((const char *)out, out_len);
    } else if (r == 0 && !encrypt) {
        result = Py_NewRef(Py_None);
    } else {
        ERR_clear_error();
        result = NULL;
        PyErr_SetString(PyExc_RuntimeError, "libcrypto failed");
    }
    PyMem_Free(out);
    return result;
}

static PyObject *aead_seal(PyObject *self, PyObject *args) {
    (void)self;
    return aead(args, 1);
}

static PyObject *aead_open(PyObject *self, PyObject *args) {
    (void)self;
    return aead(args, 0);
}

/* ---- the module ------------------------------------------------------------------------ */

static PyMethodDef methods[] = {
    {"seal_batch", seal_batch, METH_VARARGS,
     "seal_batch(key, receiver_index, counter, packets) -> bytes: core/fastpath.py rule 1"},
    {"open_batch", open_batch, METH_VARARGS,
     "open_batch(key, receiver_index, limit, window, allowed, datagrams, start, allowed6=b'')"
     " -> (stop, packets, counts): core/fastpath.py rule 2 (allowed6 positional only)"},
    {"segment", fp_segment, METH_VARARGS,
     "segment(packet, ihl, thl, total, mss, out) -> stride: core/batch.py _segment"},
    {"coalesce", fp_coalesce, METH_VARARGS,
     "coalesce(packets, partial) -> [(packet, gso_size)]: core/batch.py coalesce_batch"},
    {"aead_seal", aead_seal, METH_VARARGS,
     "aead_seal(key, nonce, aad, plaintext) -> ciphertext || tag (RFC 8439 2.8)"},
    {"aead_open", aead_open, METH_VARARGS,
     "aead_open(key, nonce, aad, ciphertext || tag) -> plaintext, or None on a bad tag"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tencrypt._fastpath",
    "The data path's seal and open loops in C; core/fastpath.py is the specification.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    chacha = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
#else
    chacha = (EVP_CIPHER *)EVP_chacha20_poly1305();
#endif
    if (chacha == NULL) {
        ERR_clear_error();
        PyErr_SetString(PyExc_ImportError, "libcrypto has no ChaCha20-Poly1305");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (fp_add_lane(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddStringConstant(m, "NAME", "c") < 0
        || PyModule_AddStringConstant(m, "OPENSSL", OPENSSL_VERSION_TEXT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
