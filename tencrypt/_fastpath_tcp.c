/* tencrypt._fastpath, part two: core/batch.py's segmentation (rules 2-4) and coalescing
 * (rule 6) in C, byte for byte; _fastpath.c holds the rules that apply to both files. */
#include "_fastpath.h"

/* ---- segment: core/batch.py rules 2-4 for one TSO super-packet ---------------------------- */

#define FIN 0x01
#define PSH 0x08
#define CWR 0x80
#define IP_MAX 65535   /* the IPv4 total length field; one IPv6 packet's bound here too */
#define IPV6_HLEN 40   /* the fixed IPv6 header (RFC 8200 §3); no extension headers here */
#define TCP_PROTO 6

/* Sum of big-endian 16-bit words (an odd last byte padded with zero), modulo 0xFFFF. On a
 * little-endian machine 8 bytes at a time: the sum of the byte-swapped words times 256 is the
 * big-endian sum, modulo 0xFFFF (RFC 1071 §2(B); batch.py's ones_sum does the same). The bulk
 * adds whole 64-bit words into two accumulators, counting each carry out of bit 63: as 2^64
 * is 1 modulo 0xFFFF (2^16 is), a carry counts 1 and each accumulator is reduced on its own
 * (RFC 1071 §4.1's end-around carry, kept apart). Half the time of adding 32-bit halves. */
static uint64_t be_sum(const unsigned char *p, Py_ssize_t len) {
    uint64_t sum = 0;
    Py_ssize_t i = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t a = 0, b = 0, carries = 0;
    for (; i + 16 <= len; i += 16) {
        uint64_t w[2];
        memcpy(w, p + i, 16);
        a += w[0];
        carries += a < w[0];
        b += w[1];
        carries += b < w[1];
    }
    sum = a % 0xFFFF + b % 0xFFFF + carries;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        sum += (w & 0xFFFFFFFFu) + (w >> 32);
    }
    uint64_t tail = 0;
    memcpy(&tail, p + i, (size_t)(len - i));
    sum += (tail & 0xFFFFFFFFu) + (tail >> 32);
    return (sum % 0xFFFF) * 256 % 0xFFFF;
#else
    for (; i + 1 < len; i += 2) sum += (uint64_t)(p[i] << 8 | p[i + 1]);
    if (i < len) sum += (uint64_t)p[i] << 8;
    return sum % 0xFFFF;
#endif
}

/* The checksum field for a region whose sum is ``sum``: -sum modulo 0xFFFF, as batch.py's
 * csum_field computes it (never 0xFFFF). */
static unsigned csum_field(uint64_t sum) {
    return (unsigned)((0xFFFF - sum % 0xFFFF) % 0xFFFF);
}

static void put_be16(unsigned char *p, unsigned v) {
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

/* An int argument as a Py_ssize_t; one beyond its range is -1, which every bound below
 * refuses. 0, or -1 with TypeError set (not an int). */
static int as_ssize(PyObject *obj, Py_ssize_t *out) {
    if (!PyLong_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "segment: an int");
        return -1;
    }
    *out = PyLong_AsSsize_t(obj);
    if (*out == -1 && PyErr_Occurred()) PyErr_Clear(); /* OverflowError: out of range */
    return 0;
}

/* The rows of a super-packet that ``segment`` checked (rule 8; ``n`` rows at ``stride``, each
 * hlen + mss bytes but the last): written into ``buf``, which may be ``src`` itself. ``src``
 * holds the headers, ``body`` the payload (``src + hlen`` but for the express lane, which
 * rewrites a copy of the headers only). */
void fp_segment_rows(const unsigned char *src, const unsigned char *body, Py_ssize_t ihl,
                     Py_ssize_t thl, Py_ssize_t total, Py_ssize_t mss, unsigned char *buf,
                     Py_ssize_t n, Py_ssize_t stride) {
    int v6 = src[0] >> 4 == 6;
    Py_ssize_t hlen = ihl + thl, payload = total - hlen;
    unsigned flags = src[ihl + 13], ident = (unsigned)(src[4] << 8 | src[5]);
    uint32_t seq0 = (uint32_t)src[ihl + 4] << 24 | (uint32_t)src[ihl + 5] << 16
                    | (uint32_t)src[ihl + 6] << 8 | src[ihl + 7];
    /* addresses and protocol; the length per row */
    uint64_t pseudo = (v6 ? be_sum(src + 8, 32) : be_sum(src + 12, 8)) + TCP_PROTO;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char *row = buf + i * stride;
        Py_ssize_t size = i < n - 1 ? mss : payload - (n - 1) * mss;
        unsigned row_flags = flags & ~(unsigned)(FIN | PSH | CWR);
        if (n == 1) row_flags = flags;
        else if (i == 0) row_flags = flags & ~(unsigned)(FIN | PSH);
        else if (i == n - 1) row_flags = flags & ~(unsigned)CWR;
        memmove(row, src, (size_t)hlen); /* out may be packet's own buffer: no memcpy UB */
        memmove(row + hlen, body + i * mss, (size_t)size);
        if (v6) {
            put_be16(row + 4, (unsigned)(thl + size));
        } else {
            put_be16(row + 2, (unsigned)(hlen + size));
            put_be16(row + 4, (ident + (unsigned)i) & 0xFFFF);
            put_be16(row + 10, 0);
        }
        uint32_t seq = seq0 + (uint32_t)((uint64_t)i * (uint64_t)mss);
        row[ihl + 4] = (unsigned char)(seq >> 24);
        row[ihl + 5] = (unsigned char)(seq >> 16);
        row[ihl + 6] = (unsigned char)(seq >> 8);
        row[ihl + 7] = (unsigned char)seq;
        row[ihl + 13] = (unsigned char)row_flags;
        put_be16(row + ihl + 16, 0);
        if (!v6) put_be16(row + 10, csum_field(be_sum(row, ihl)));
        uint64_t tcp = be_sum(row + ihl, thl + size) + pseudo + (uint64_t)(thl + size);
        put_be16(row + ihl + 16, csum_field(tcp));
    }
}

/* segment(packet, ihl, thl, total, mss, out) -> stride: the super-packet's segments written
 * into ``out``, segment i at i * stride (hlen + mss rounded up to 4), the last one hlen + the
 * rest of the payload long: byte for byte what core/batch.py's _segment makes. Every argument
 * is checked before any arithmetic on it (core/batch.py ``segmentable``: header lengths —
 * ihl exactly 40 when the packet's first nibble is 6 —, mss > 0, hlen + mss within 65535,
 * total within the packet; then the segments' count against ``out``): outside those bounds
 * nothing is written and the stride is 0, as in the pure twin. IPv6 (core/batch.py rule 2a):
 * the payload length per segment, no IP checksum or id, the TCP checksum over the IPv6
 * pseudo-header (RFC 8200 §8.1). Constant work per call: the loop below is unchanged. */
PyObject *fp_segment(PyObject *self, PyObject *args) {
    Py_buffer pkt, out;
    PyObject *ihl_obj, *thl_obj, *total_obj, *mss_obj;
    Py_ssize_t ihl, thl, total, mss;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*OOOOw*:segment", &pkt, &ihl_obj, &thl_obj, &total_obj,
                          &mss_obj, &out))
        return NULL;
    if (as_ssize(ihl_obj, &ihl) < 0 || as_ssize(thl_obj, &thl) < 0
        || as_ssize(total_obj, &total) < 0 || as_ssize(mss_obj, &mss) < 0) {
        PyBuffer_Release(&pkt);
        PyBuffer_Release(&out);
        return NULL;
    }
    Py_ssize_t hlen = 0, payload = 0, n = 0, stride = 0;
    int v6 = pkt.len > 0 && ((const unsigned char *)pkt.buf)[0] >> 4 == 6;
    if ((v6 ? ihl == IPV6_HLEN : ihl >= 20 && ihl <= 60 && ihl % 4 == 0)
        && thl >= 20 && thl <= 60 && thl % 4 == 0
        && mss >= 1 && mss <= IP_MAX - ihl - thl && total >= ihl + thl && total <= pkt.len) {
        hlen = ihl + thl; /* each term bounded above: no overflow from here on */
        payload = total - hlen;
        n = payload > 0 ? (payload - 1) / mss + 1 : 1;
        Py_ssize_t s = (hlen + mss + 3) & ~(Py_ssize_t)3;
        if (n <= out.len / s) stride = s;
    }
    if (stride == 0) {
        PyBuffer_Release(&pkt);
        PyBuffer_Release(&out);
        return PyLong_FromLong(0);
    }
    Py_BEGIN_ALLOW_THREADS
    fp_segment_rows(pkt.buf, (const unsigned char *)pkt.buf + hlen, ihl, thl, total, mss, out.buf,
                    n, stride);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&pkt);
    PyBuffer_Release(&out);
    return PyLong_FromSsize_t(stride);
}

/* ---- coalesce: core/batch.py rule 6 (coalesce_batch) --------------------------------------- */

#define SYN 0x02
#define RST 0x04
#define URG 0x20

typedef struct {
    Py_ssize_t first, count; /* packets[first .. first + count) form the output item */
    Py_ssize_t hlen, mss;
    unsigned last_flags;
    Py_ssize_t offset, len; /* the merged packet in the scratch buffer (count > 1) */
} Item;

static unsigned be16(const unsigned char *p) { return (unsigned)(p[0] << 8 | p[1]); }

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* The IP packet's length as its header says: IPv4's total length, or 40 + IPv6's payload
 * length (``p`` holds at least 6 bytes). */
static Py_ssize_t ip_total(const unsigned char *p, int v6) {
    return v6 ? IPV6_HLEN + (Py_ssize_t)be16(p + 4) : (Py_ssize_t)be16(p + 2);
}

/* batch.py _run_start: 1 and the fields when ``p`` may start a run, else 0: IPv4, or IPv6
 * without extension headers. */
static int run_start(const unsigned char *p, Py_ssize_t len, Py_ssize_t *ihl_out,
                     Py_ssize_t *hlen, Py_ssize_t *mss, uint32_t *seq, unsigned *flags) {
    if (len < 40) return 0;
    Py_ssize_t ihl, total;
    if (p[0] >> 4 == 6) {
        if (len < IPV6_HLEN + 20 || p[6] != TCP_PROTO) return 0;
        ihl = IPV6_HLEN;
        total = ip_total(p, 1);
        if (total > len) return 0;
    } else {
        ihl = (p[0] & 0x0F) << 2;
        total = ip_total(p, 0);
        if (p[0] >> 4 != 4 || ihl < 20 || p[9] != TCP_PROTO || (be16(p + 6) & 0x3FFF)
            || total > len)
            return 0;
    }
    if (total < ihl + 20) return 0;
    Py_ssize_t h = ihl + ((p[ihl + 12] >> 4) << 2);
    unsigned f = p[ihl + 13];
    if (!(ihl + 20 <= h && h < total) || (f & (SYN | RST | URG))) return 0;
    *ihl_out = ihl;
    *hlen = h;
    *mss = total - h;
    *seq = be32(p + ihl + 4);
    *flags = f;
    return 1;
}

/* batch.py _key_mask as bytes: 0xFF where the first ``hlen`` bytes of a run's packets must be
 * equal, 0 at IP total length, id and checksum (IPv6: the payload length), TCP seq, flags and
 * checksum. The version nibble is kept: an IPv4 and an IPv6 packet never match. ``mask``
 * holds FP_KEY_MAX bytes; ``hlen`` is at most that (an IPv4 and a TCP header of 60 each). */
#define FP_KEY_MAX 120
static void key_mask(unsigned char *mask, Py_ssize_t ihl, Py_ssize_t hlen, int v6) {
    memset(mask, 0xFF, (size_t)hlen);
    if (v6) {
        memset(mask + 4, 0, 2);
    } else {
        memset(mask + 2, 0, 4);
        memset(mask + 10, 0, 2);
    }
    memset(mask + ihl + 4, 0, 4);
    mask[ihl + 13] = 0;
    memset(mask + ihl + 16, 0, 2);
}

/* Equal under ``mask`` over the first ``hlen`` bytes: 8 bytes at a time, then byte by byte
 * (never reading past ``hlen``). */
static int same_key(const unsigned char *a, const unsigned char *b, const unsigned char *mask,
                    Py_ssize_t hlen) {
    Py_ssize_t i = 0;
    for (; i + 8 <= hlen; i += 8) {
        uint64_t x, y, m;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        memcpy(&m, mask + i, 8);
        if ((x ^ y) & m) return 0;
    }
    for (; i < hlen; i++)
        if ((a[i] ^ b[i]) & mask[i]) return 0;
    return 1;
}

/* batch.py _merge for count > 1: the run's bytes into ``out`` with fresh checksums. */
/* The TCP pseudo-header's sum (RFC 793 §3.1; RFC 8200 §8.1 for IPv6, the family being the
 * first nibble) with the TCP length of a ``len``-byte packet whose IP header is ``ihl`` bytes. */
static uint64_t pseudo_sum(const unsigned char *p, Py_ssize_t len, Py_ssize_t ihl) {
    int v6 = p[0] >> 4 == 6;
    return (v6 ? be_sum(p + 8, 32) : be_sum(p + 12, 8)) + TCP_PROTO + (uint64_t)(len - ihl);
}

/* core/batch.py rewrite_partial_csum: the TCP checksum field of a CHECKSUM_PARTIAL packet gets
 * the pseudo-header's sum (never 0), as a TUN write with NEEDS_CSUM wants it. */
void fp_partial_csum(unsigned char *p, Py_ssize_t len, Py_ssize_t ihl) {
    unsigned ck = (unsigned)(pseudo_sum(p, len, ihl) % 0xFFFF);
    put_be16(p + ihl + 16, ck ? ck : 0xFFFF);
}

static Py_ssize_t merge_into(unsigned char *out, const Piece *bufs, const Item *it,
                             int partial) {
    const unsigned char *head = bufs[it->first].buf;
    Py_ssize_t hlen = it->hlen, pos = hlen + it->mss;
    int v6 = head[0] >> 4 == 6;
    memcpy(out, head, (size_t)pos);
    for (Py_ssize_t k = 1; k < it->count; k++) {
        const unsigned char *p = bufs[it->first + k].buf;
        Py_ssize_t total = ip_total(p, v6);
        memcpy(out + pos, p + hlen, (size_t)(total - hlen));
        pos += total - hlen;
    }
    Py_ssize_t ihl = v6 ? IPV6_HLEN : (out[0] & 0x0F) << 2;
    out[ihl + 13] |= (unsigned char)(it->last_flags & (PSH | FIN));
    put_be16(out + ihl + 16, 0);
    if (v6) {
        put_be16(out + 4, (unsigned)(pos - IPV6_HLEN));
    } else {
        put_be16(out + 2, (unsigned)pos);
        put_be16(out + 10, 0);
        put_be16(out + 10, csum_field(be_sum(out, ihl)));
    }
    if (partial)
        fp_partial_csum(out, pos, ihl);
    else
        put_be16(out + ihl + 16,
                 csum_field(pseudo_sum(out, pos, ihl) + be_sum(out + ihl, pos - ihl)));
    return pos;
}

/* The plan of batch.py coalesce_batch's loop: which packets become which output item. */
static Py_ssize_t plan_runs(const Piece *bufs, Py_ssize_t n, Item *items) {
    Py_ssize_t m = 0, hlen = 0, mss = 0, room = 0, ihl = 20;
    unsigned char mask[FP_KEY_MAX]; /* the open run's key_mask */
    uint32_t next_seq = 0;
    unsigned open_flags = 0;
    int v6 = 0; /* the open run's family */
    Item *run = NULL; /* the open run, if any */
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *p = bufs[i].buf;
        Py_ssize_t len = bufs[i].len;
        if (run != NULL && len > hlen && same_key(p, bufs[run->first].buf, mask, hlen)) {
            Py_ssize_t total = ip_total(p, v6), plen = total - hlen;
            uint32_t seq = be32(p + ihl + 4);
            unsigned flags = p[ihl + 13];
            if (seq == next_seq && 0 < plen && plen <= mss && plen <= room && total <= len
                && (flags & ~(unsigned)(PSH | FIN)) == open_flags) {
                run->count++;
                next_seq = seq + (uint32_t)plen;
                room -= plen;
                if (plen < mss || (flags & (PSH | FIN))) {
                    run->last_flags = flags;
                    run = NULL;
                }
                continue;
            }
        }
        run = NULL;
        Item *it = &items[m++];
        it->first = i;
        it->count = 1;
        it->last_flags = 0;
        it->hlen = it->mss = 0;
        uint32_t seq;
        unsigned flags;
        Py_ssize_t start_ihl;
        if (!run_start(p, len, &start_ihl, &it->hlen, &it->mss, &seq, &flags)
            || (flags & (PSH | FIN))) {
            it->mss = 0; /* passed through as it is */
            continue;
        }
        hlen = it->hlen;
        mss = it->mss;
        ihl = start_ihl;
        v6 = p[0] >> 4 == 6;
        key_mask(mask, ihl, hlen, v6);
        next_seq = seq + (uint32_t)mss;
        room = IP_MAX - hlen - mss;
        open_flags = flags & ~(unsigned)CWR;
        run = it;
    }
    return m;
}

/* coalesce_batch (rule 6) of at most FP_MAX_RUN packets, for the express lane: each output
 * item written into ``out`` after ``gap`` bytes left free (a merged one with its partial
 * checksum, ``partial``), ``lens[k]`` its length and ``gsos[k]`` its gso_size (0: a packet
 * passed through as it is). ``out`` holds the packets' total length plus ``gap`` per packet.
 * Returns the number of items, or -1 when ``n`` is above FP_MAX_RUN (nothing written). */
Py_ssize_t fp_coalesce_into(const Piece *bufs, Py_ssize_t n, int partial, Py_ssize_t gap,
                            unsigned char *out, Py_ssize_t *lens, Py_ssize_t *gsos) {
    Item items[FP_MAX_RUN];
    if (n > FP_MAX_RUN) return -1;
    Py_ssize_t m = plan_runs(bufs, n, items), used = 0;
    for (Py_ssize_t k = 0; k < m; k++) {
        used += gap;
        if (items[k].count > 1) {
            lens[k] = merge_into(out + used, bufs, &items[k], partial);
            gsos[k] = items[k].mss;
        } else {
            const Piece *one = &bufs[items[k].first];
            memcpy(out + used, one->buf, (size_t)one->len);
            lens[k] = one->len;
            gsos[k] = 0;
        }
        used += lens[k];
    }
    return m;
}

/* coalesce(packets, partial) -> [(packet, gso_size)]: core/batch.py coalesce_batch, byte for
 * byte; packets that start no run (or a run of one) come back as the same objects. */
PyObject *fp_coalesce(PyObject *self, PyObject *args) {
    PyObject *packets;
    int partial;
    (void)self;
    if (!PyArg_ParseTuple(args, "Op:coalesce", &packets, &partial)) return NULL;
    Pieces batch;
    if (fp_get_pieces(packets, 0, &batch) < 0) return NULL;
    const Piece *bufs = batch.pieces;
    Py_ssize_t n = batch.count;
    Item *items = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Item));
    Py_ssize_t scratch_len = 1;
    for (Py_ssize_t i = 0; i < n; i++) scratch_len += bufs[i].len;
    unsigned char *scratch = PyMem_Malloc((size_t)scratch_len);
    PyObject *result = NULL;
    if (items == NULL || scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t m = 0;
    Py_BEGIN_ALLOW_THREADS
    m = plan_runs(bufs, n, items);
    Py_ssize_t used = 0;
    for (Py_ssize_t k = 0; k < m; k++) {
        if (items[k].count > 1) {
            items[k].offset = used;
            items[k].len = merge_into(scratch + used, bufs, &items[k], partial);
            used += items[k].len;
        }
    }
    Py_END_ALLOW_THREADS
    result = PyList_New(m);
    if (result == NULL) goto done;
    for (Py_ssize_t k = 0; k < m; k++) {
        PyObject *packet, *size;
        if (items[k].count > 1) {
            packet = PyByteArray_FromStringAndSize((const char *)scratch + items[k].offset,
                                                   items[k].len);
            size = PyLong_FromSsize_t(items[k].mss);
        } else {
            packet = PySequence_GetItem(packets, items[k].first);
            size = PyLong_FromLong(0);
        }
        PyObject *pair = (packet && size) ? PyTuple_Pack(2, packet, size) : NULL;
        Py_XDECREF(packet);
        Py_XDECREF(size);
        if (pair == NULL || PyList_SetItem(result, k, pair) < 0) {
            Py_CLEAR(result);
            goto done;
        }
    }
done:
    fp_release_pieces(&batch);
    PyMem_Free(items);
    PyMem_Free(scratch);
    return result;
}
