/* tencrypt._fastpath.Lane: the express lane for established flows (issue 26), in C.
 *
 * tencrypt/core/express.py is the specification: read its rules first. ``Lane`` reads the
 * tables that ``core.express.Express`` writes (three dicts) and does per packet what
 * ``Express.outbound`` / ``Express.inbound`` do, byte for byte; the state changes are the
 * Python calls the tables hold (``take`` / ``accept``, and under a lease, rule 6, their
 * ``commit``, replayed in order before any Python runs), so the two lanes cannot differ
 * there. On top, the two pumps move the packets themselves:
 *
 *  - ``pump_tun(tun_fd, udp_fd, now, limit, lone)``: read frames from tenc0; each one the lane
 *    takes is sealed and sent (one ``sendto``; a TSO super-packet's segments, core/express.py
 *    rule 2a, as UDP GSO sends, ``send_run``); the first it cannot take ends the pump and is
 *    handed back (bytes, as read) with the count of datagrams the socket refused:
 *    ``([frame], send_dropped)``. ``lone``: after a first frame of at most that many bytes,
 *    taken, no second read (a lone small packet: the EAGAIN read would cost a system call
 *    for nothing on a cold path; level-triggered readiness calls again if more is there).
 *  - ``pump_udp(udp_fd, tun_fd, now, limit, lone)``: receive datagrams (UDP GRO reads as
 *    ``recv_batch`` asks for them); a lone datagram the lane takes is opened and written to
 *    tenc0, a GRO read of several it takes whole (rule 2b) is opened, coalesced and written as
 *    the daemon's _inject writes it (TSO frames); a truncated read, or one the lane does not
 *    take, ends the pump and is handed back as ``(data, gro_size, truncated, (host, port))``:
 *    ``([read], inject_errors)``.
 *  - ``outbound(frame, now)`` / ``inbound(datagram, addr, now)`` / ``inbound_run(data, size,
 *    addr, now)``: the same work without I/O, the twin of core/express.py's (tests compare
 *    them).
 *  - ``wait(epfd, timeout, maxevents, tun_fd, udp_fd, udp_ok, limit, lone, now=None, spin=0,
 *    quiet=0)``: the event loop's epoll call (tencrypt/linux/spin.py rule 5). It blocks in
 *    ``epoll_wait`` with the GIL released and serves a readiness of tenc0 (and of the socket, if
 *    ``udp_ok``) itself, by the pump above, so an established flow's packet wakes straight
 *    into C: no selector, no callback, no Python but its ``take``/``accept``. It returns,
 *    as ``[(fd, events)]``, only what Python must see: any other descriptor, any event but a
 *    plain EPOLLIN, and a pump that handed something back or counted a drop — that result
 *    is kept in the lane and is what the descriptor's next ``pump_tun``/``pump_udp`` returns,
 *    first and without reading, so the order of the packets holds. Nothing to return: it
 *    waits again, until ``timeout`` (seconds, None: none; rounded up to the millisecond as
 *    ``select.epoll.poll``) is over (then ``[]``). A signal returns ``[]`` after Python's
 *    handlers ran (the loop's wake-up descriptor then reports it too). ``spin`` (seconds):
 *    linux/spin.py's polling window, its rules 1-3 run here (the lane's state:
 *    ``spin_stats()``) on every event whoever serves it, but a wake-up whose every event
 *    was a pod's packet the lane sent to the network: its answer is a network round trip
 *    away, so it opens no window. A back-to-back exchange the lane carries is caught awake
 *    as by the selector, and a sparse call's sender does not poll for its answer. Nor does
 *    a wake-up that carried bulk (a super-packet, a GRO read) open a window.
 *    ``quiet`` (seconds): tencrypt/daemon.py's read rule (READS) for the pumps it runs: a
 *    descriptor it served again within ``quiet`` is hot and read until EAGAIN (``lone`` 0);
 *    otherwise a lone small packet is read alone.
 * Packets (core/express.py rule 2): IPv4 TCP without SYN/FIN/RST, UDP, and ICMP echo request
 * and reply (type 8/0, code 0, id not 0; keyed (id, 0) / (0, id)), never a fragment; an echo's
 * translation rewrites its address and the IPv4 header checksum only. TCP also as a TSO
 * super-packet out (rule 2a: at most MAX_SEGMENTS segments within the MTU) and as a GRO read
 * in (rule 2b: all or nothing).
 * The GIL is held throughout: the take/accept calls, the session's counter and the replay
 * window are then touched by one thread at a time (core/express.py rule 4). IPv4 tunnel
 * sockets only (the daemon does not build a lane for an IPv6-only pod).
 */
#include "_fastpath.h"

#include <errno.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <math.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <sys/uio.h>
#include <unistd.h>

#include <openssl/err.h>

#define VNET 10
#define HEADER_LEN 16
#define TAG_LEN 16
#define OVERHEAD 32
#define BUF 65536
#define ICMP 1
#define TCP 6
#define UDP 17
#define ECHO_REPLY 0
#define ECHO_REQUEST 8
#define GSO_TCPV4 1 /* virtio_net.h VIRTIO_NET_HDR_GSO_TCPV4 */
#define GSO_ECN 0x80
#define MAX_SEGMENTS FP_MAX_RUN /* a super-packet's segments, a GRO read's datagrams */
#define UDP_MAX_PAYLOAD (65535 - 20 - 8)
#define LOG_CAP 64 /* leased packets recorded before their commits must run */
#define FOUND_CAP 8 /* flows per direction one call keeps what it looked up of */
#define SLOT_CAP 4  /* sessions likewise */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

typedef struct {
    PyObject_HEAD
    PyObject *out, *inn, *slots; /* core/express.py rule 1 */
    unsigned char pod4[4];
    Py_ssize_t mtu;
    EVP_CIPHER_CTX *ctx;
    unsigned char *rbuf;  /* VNET + BUF: what was read */
    unsigned char *work;  /* VNET + BUF: the packet being worked on (plaintext) */
    unsigned char *sealed; /* cap_sealed: one datagram, or a super-packet's */
    unsigned char *segs;   /* cap_segs: a super-packet's segments (plaintext) */
    Py_ssize_t cap_sealed, cap_segs;
    unsigned char *plain;  /* BUF: a GRO read's datagrams, opened */
    unsigned char *frames; /* BUF + MAX_SEGMENTS * VNET: what a GRO read gives tenc0 */
    Py_ssize_t frame_len[MAX_SEGMENTS], nframes;
    Py_ssize_t n_sealed, n_opened; /* packets the pumps took, each way (``counts()``) */
    PyObject *last_ep;    /* the endpoint whose sockaddr is cached */
    struct sockaddr_in last_sa;
    struct sockaddr_in out_sa; /* lane_out: where its datagrams go (out_sa_ok 0: nowhere) */
    int out_sa_ok;
    /* ``wait``, per descriptor (the socket [0], tenc0 [1], as ``served``): what a pump inside
     * it handed back (a list, or NULL) and its count of send drops / inject errors, kept for
     * the next ``pump_udp`` / ``pump_tun`` call */
    PyObject *back[2];
    Py_ssize_t back_n[2];
    Py_ssize_t n_woken; /* wake-ups ``wait`` served without returning to Python */
    Py_ssize_t n_bulk;  /* super-packets and GRO reads the pumps took (spin.py rule 5) */
    /* ``wait``'s polling window: linux/spin.py's rules 1-3, its state here (rule 5) */
    double spin, budget, last_event;
    Py_ssize_t polls, misses, grown;
    double served[2]; /* ``wait``: when it last served the socket [0] and tenc0 [1] (READS) */
    /* core/express.py rule 6: the epoch (a new one at every call from Python), the packets
     * admitted under a lease each way, and the state changes they owe, replayed in order by
     * ``commit`` before any Python runs */
    uint64_t epoch;
    Py_ssize_t n_leased[2]; /* out, in */
    struct Record {
        PyObject *fn, *refs; /* take or accept (bound); in: the flow's refs (else NULL) */
        struct sockaddr_in from; /* in: the datagram's source */
        Py_ssize_t nbytes, count; /* out: count is take's ``segments`` */
        double now;
    } log[LOG_CAP];
    Py_ssize_t nlog;
    /* What one call from Python looked up, kept until it returns (``forget_call``): nothing
     * the lane reads can change before then but through the lane itself (rule 6) — the
     * tables' entries (new references), each session's slot with its replay window (the ring
     * held as a buffer, ``top`` kept here and written back at the end) */
    struct Found {
        unsigned char key[13];
        PyObject *entry;
    } found[2][FOUND_CAP]; /* out [0], inn [1] */
    int nfound[2];
    struct SlotFound {
        uint32_t index;
        PyObject *slot, *window, *accept; /* slot: a new reference; the others borrowed */
        const unsigned char *key;
        unsigned long long limit;
        Py_buffer ring;
        Window w;
        int moved; /* w.top changed: written back at the end */
    } slotf[SLOT_CAP];
    int nslotf;
} Lane;

/* core/express.py rule 6: an entry's lease cell (a bytearray of LEASE_BYTES: an ``out`` entry's
 * item 5, an ``inn`` entry's item 3) */
typedef struct {
    uint64_t epoch;      /* the epoch it was granted in; 0: none */
    double until, last, ttl;
    uint64_t bound;      /* out: the highest counter plus packets */
    uint32_t index;      /* in: the session's index */
    uint32_t addr;       /* out: the endpoint, in: the datagram's source (network order) */
    uint16_t port;
} Lease;
#define LEASE_BYTES 64 /* core/express.py LEASE_BYTES */
_Static_assert(sizeof(Lease) <= LEASE_BYTES, "a lease fits its cell");

static uint64_t epochs; /* every lane's epochs are distinct (the GIL serialises) */
static PyObject *str_send_counter, *str_commit, *str_self;

static uint16_t get16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static void put16(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}
static uint32_t get32be(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* core/checksum.py fold: a non-zero sum that reduces to 0 is 0xFFFF */
static uint64_t fold(uint64_t total) {
    uint64_t s = total % 0xFFFF;
    return s == 0 && total ? 0xFFFF : s;
}
/* csum_adjust: ~fold(~hc + delta) */
static uint32_t adjust(uint32_t hc, uint64_t delta) {
    return (uint32_t)(~fold((uint64_t)(hc ^ 0xFFFF) + delta) & 0xFFFF);
}

/* core/batch.py ones_sum: big-endian word sum of buf[start:end] mod 0xFFFF */
static uint64_t ones_sum(const unsigned char *p, Py_ssize_t start, Py_ssize_t end) {
    uint64_t total = 0;
    Py_ssize_t i = start;
    for (; i + 1 < end; i += 2) total += (uint64_t)(p[i] << 8 | p[i + 1]);
    if (i < end) total += (uint64_t)p[i] << 8;
    return total % 0xFFFF;
}

/* core/express.py key13: eligibility (rule 2) and the 13-byte key; 0 when not eligible */
static int key13(const unsigned char *p, Py_ssize_t n, unsigned char *key) {
    if (n < 28 || p[0] != 0x45 || get16(p + 2) != n || (p[6] & 0x3F) || p[7]) return 0;
    unsigned char proto = p[9];
    if (proto == TCP) {
        int thl = (p[32] >> 4) << 2;
        if (n < 40 || (p[33] & 0x07) || thl < 20 || thl > n - 20) return 0;
    } else if (proto == ICMP) { /* an echo: request (id, 0), reply (0, id); id 0 is not */
        if (p[21] || (p[20] != ECHO_REQUEST && p[20] != ECHO_REPLY) || (!p[24] && !p[25]))
            return 0;
        key[0] = proto;
        memcpy(key + 1, p + 12, 8);
        memset(key + 9, 0, 4);
        memcpy(key + (p[20] == ECHO_REQUEST ? 9 : 11), p + 24, 2);
        return 1;
    } else if (proto != UDP) {
        return 0;
    }
    key[0] = proto;
    memcpy(key + 1, p + 12, 12);
    return 1;
}

/* core/packet.py rewrite_addr (IPv4, a whole first fragment) then rewrite_port, for the
 * source (off 12, port at l4) or the destination (off 16, port at l4 + 2). An ICMP echo:
 * the address and the IP header checksum only (ICMP's has no pseudo-header; no port). */
static void rewrite(unsigned char *p, Py_ssize_t n, int dst, const unsigned char *addr,
                    uint32_t port) {
    int proto = p[9];
    Py_ssize_t l4 = 20;
    Py_ssize_t at = proto == TCP ? l4 + 16 : l4 + 6;
    int has_l4 = proto == TCP ? l4 + 20 <= n : proto == UDP;
    uint32_t old = get32be(p + (dst ? 16 : 12)), new = get32be(addr);
    if (old != new) {
        uint64_t delta = (uint64_t)(old ^ 0xFFFFFFFFu) + new;
        memcpy(p + (dst ? 16 : 12), addr, 4);
        uint32_t hc = get16(p + 10);
        put16(p + 10, adjust(hc, delta));
        if (has_l4) {
            uint32_t ck = get16(p + at);
            if (!(ck == 0 && proto == UDP)) {
                uint32_t ck2 = adjust(ck, delta);
                if (ck2 == 0 && proto == UDP) ck2 = 0xFFFF;
                put16(p + at, ck2);
            }
        }
    }
    if (proto == ICMP) return;
    Py_ssize_t pat = dst ? l4 + 2 : l4;
    uint32_t oldp = get16(p + pat);
    if (oldp == port) return;
    put16(p + pat, port);
    uint64_t changes = (uint64_t)(oldp ^ 0xFFFF) + port;
    if (l4 + (proto == TCP ? 20 : 8) > n) return;
    uint32_t ck = get16(p + at);
    if (ck == 0 && proto == UDP) return;
    uint32_t ck2 = adjust(ck, changes);
    if (ck2 == 0 && proto == UDP) ck2 = 0xFFFF;
    put16(p + at, ck2);
}

/* ---- leases (core/express.py rule 6) ------------------------------------------------------ */

static void new_epoch(Lane *self) { self->epoch = ++epochs; }

/* The lease cell of ``entry`` (its item ``i``), or NULL if it has none. */
static Lease *lease_cell(PyObject *entry, Py_ssize_t i) {
    PyObject *b = PyTuple_Size(entry) > i ? PyTuple_GetItem(entry, i) : NULL;
    if (b == NULL || !PyByteArray_CheckExact(b) || PyByteArray_Size(b) < LEASE_BYTES)
        return NULL;
    return (Lease *)PyByteArray_AsString(b);
}

/* The lease holds for a packet at ``now``: its epoch, its clock checks. */
static int lease_holds(const Lane *self, const Lease *l, double now) {
    return l->epoch == self->epoch && now < l->until && now - l->last < l->ttl;
}

/* Fill a lease from a grant's (until, [bound,] ttl) items of ``got`` from ``at``. */
static void lease_grant(Lane *self, Lease *l, PyObject *got, Py_ssize_t at, int out, double now,
                        uint32_t index, const struct sockaddr_in *sa) {
    l->epoch = 0;
    if (!PyTuple_Check(got) || PyTuple_Size(got) != at + 2 + out) return;
    double until = PyFloat_AsDouble(PyTuple_GetItem(got, at));
    double ttl = PyFloat_AsDouble(PyTuple_GetItem(got, at + 1 + out));
    unsigned long long bound = out ? PyLong_AsUnsignedLongLong(PyTuple_GetItem(got, at + 1)) : 0;
    if (PyErr_Occurred()) { /* not a lease: the next packet asks again */
        PyErr_Clear();
        return;
    }
    l->until = until;
    l->ttl = ttl;
    l->bound = bound;
    l->last = now;
    l->index = index;
    l->addr = sa->sin_addr.s_addr;
    l->port = sa->sin_port;
    l->epoch = self->epoch;
}

static PyObject *addr_of(const struct sockaddr_in *sa);

/* The owed state changes, in order: each record's ``commit`` (its take's or accept's owner).
 * 0, or -1 with an exception (a bug in commit): the rest are dropped. */
static int replay(Lane *self) {
    Py_ssize_t n = self->nlog;
    if (n == 0) return 0;
    struct Record log[LOG_CAP];
    memcpy(log, self->log, (size_t)n * sizeof(log[0]));
    self->nlog = 0;
    int rc = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        struct Record *r = &log[i];
        if (rc == 0) {
            PyObject *owner = PyObject_GetAttr(r->fn, str_self); /* a bound take or accept */
            PyObject *commit = owner == NULL ? NULL : PyObject_GetAttr(owner, str_commit);
            Py_XDECREF(owner);
            PyObject *got = NULL, *addr = NULL;
            if (commit != NULL && r->refs == NULL)
                got = PyObject_CallFunction(commit, "ndn", r->nbytes, r->now, r->count);
            else if (commit != NULL && (addr = addr_of(&r->from)) != NULL)
                got = PyObject_CallFunction(commit, "nOdOn", r->nbytes, addr, r->now, r->refs,
                                            r->count);
            Py_XDECREF(addr);
            Py_XDECREF(commit);
            if (got == NULL) rc = -1;
            Py_XDECREF(got);
        }
        Py_XDECREF(r->fn);
        Py_XDECREF(r->refs);
    }
    return rc;
}

/* Owe a leased packet's state changes (a full log is replayed first). 0, or -1. */
static int record(Lane *self, PyObject *fn, const struct sockaddr_in *from, PyObject *refs,
                  Py_ssize_t nbytes, Py_ssize_t count, double now) {
    if (self->nlog == LOG_CAP && replay(self) < 0) return -1;
    struct Record *r = &self->log[self->nlog++];
    r->fn = Py_NewRef(fn);
    r->refs = Py_XNewRef(refs);
    if (from != NULL) r->from = *from;
    r->nbytes = nbytes;
    r->count = count;
    r->now = now;
    return 0;
}

static int set_top(PyObject *window, const Window *w);

/* What the call looked up goes (struct Found, struct SlotFound): each window's top written
 * back, its ring released. 0, or -1 with an exception (every reference released anyway). */
static int forget_call(Lane *self) {
    int rc = 0;
    for (int dir = 0; dir < 2; dir++) {
        for (int i = 0; i < self->nfound[dir]; i++) Py_DECREF(self->found[dir][i].entry);
        self->nfound[dir] = 0;
    }
    for (int i = 0; i < self->nslotf; i++) {
        struct SlotFound *f = &self->slotf[i];
        if (f->moved && rc == 0 && set_top(f->window, &f->w) < 0) rc = -1;
        PyBuffer_Release(&f->ring);
        Py_DECREF(f->slot);
    }
    self->nslotf = 0;
    return rc;
}

/* Before Python runs: what the call looked up forgotten, what is owed replayed (rule 6). */
static int before_python(Lane *self) {
    if (forget_call(self) < 0) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (replay(self) < 0) PyErr_Clear();
        PyErr_Restore(et, ev, tb);
        return -1;
    }
    return replay(self);
}

/* A call from Python ends: before_python, whatever the result (its exception kept first). */
static PyObject *finish(Lane *self, PyObject *result) {
    if (self->nlog == 0 && self->nslotf == 0 && !self->nfound[0] && !self->nfound[1])
        return result;
    if (result == NULL) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (before_python(self) < 0) PyErr_Clear();
        PyErr_Restore(et, ev, tb);
        return NULL;
    }
    if (before_python(self) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

/* The ``out`` (dir 0) or ``inn`` (1) entry of ``key``, borrowed (held until the call ends):
 * NULL if none, or on an exception. */
static PyObject *lookup(Lane *self, int dir, const unsigned char *key) {
    struct Found *f = self->found[dir];
    for (int i = 0; i < self->nfound[dir]; i++)
        if (memcmp(f[i].key, key, 13) == 0) return f[i].entry;
    PyObject *kobj = PyBytes_FromStringAndSize((const char *)key, 13);
    if (kobj == NULL) return NULL;
    PyObject *entry = PyDict_GetItem(dir ? self->inn : self->out, kobj); /* borrowed */
    Py_DECREF(kobj);
    if (entry != NULL && self->nfound[dir] < FOUND_CAP) {
        struct Found *n = &f[self->nfound[dir]++];
        memcpy(n->key, key, 13);
        n->entry = Py_NewRef(entry);
    }
    return entry;
}

/* ---- out: one frame -> one datagram, or a super-packet -> its segments' datagrams --------- */

static int endpoint_sa(Lane *self, PyObject *ep, struct sockaddr_in *sa);

/* What ``take`` granted for a learnt flow: the entry (a new reference, kept while its bytes are
 * read), its fields, the counter of the first datagram, the endpoint (a new reference; NULL
 * under a lease) and its address (sa_ok 0: not an IPv4 endpoint). */
typedef struct {
    PyObject *entry, *ep;
    const unsigned char *key32, *new_dst; /* new_dst: NULL when the flow is not translated */
    uint32_t index, new_dport;
    uint64_t counter;
    struct sockaddr_in sa;
    int sa_ok;
} Taken;

static void taken_release(Taken *t) {
    Py_XDECREF(t->entry);
    Py_XDECREF(t->ep);
}

/* A packet (or ``segments``) of a leased entry: 1, admitted (the session's counter read and
 * advanced, ``commit`` owed); 0: the lease does not cover it, nothing changed; -1: an
 * exception. */
static int lease_out(Lane *self, Lease *l, PyObject *take, PyObject *s, Py_ssize_t nbytes,
                     double now, Py_ssize_t segments, Taken *t) {
    uint64_t n = segments ? (uint64_t)segments : 1;
    if (!lease_holds(self, l, now)) return 0;
    PyObject *cv = PyObject_GetAttr(s, str_send_counter);
    unsigned long long c = cv == NULL ? 0 : PyLong_AsUnsignedLongLong(cv);
    Py_XDECREF(cv);
    int r = PyErr_Occurred() ? -1 : c + n <= l->bound && c + n > c;
    if (r == 1) r = record(self, take, NULL, NULL, nbytes, segments, now) < 0 ? -1 : 1;
    if (r == 1) { /* rule 4: the one counter, advanced where it is used */
        PyObject *nv = PyLong_FromUnsignedLongLong(c + n);
        if (nv == NULL || PyObject_SetAttr(s, str_send_counter, nv) < 0) r = -1;
        Py_XDECREF(nv);
    }
    if (r != 1) return r;
    l->last = now;
    t->counter = c;
    t->ep = NULL;
    memset(&t->sa, 0, sizeof(t->sa));
    t->sa.sin_family = AF_INET;
    t->sa.sin_addr.s_addr = l->addr;
    t->sa.sin_port = l->port;
    t->sa_ok = 1;
    self->n_leased[0] += (Py_ssize_t)n;
    return 1;
}

/* The entry of flow ``key`` and its ``take(nbytes, now[, segments])`` (core/express.py rule 3;
 * ``segments`` 0: one packet, else a super-packet of that many): 1 with ``t`` filled; 0: not
 * the lane's, nothing changed; -1: an exception (a bug in take, or no memory). */
static int take_flow(Lane *self, const unsigned char *key, Py_ssize_t nbytes, double now,
                     Py_ssize_t segments, Taken *t) {
    PyObject *entry = lookup(self, 0, key);
    if (entry == NULL && PyErr_Occurred()) return -1;
    if (entry == NULL || !PyTuple_Check(entry) || PyTuple_Size(entry) < 5) return 0;
    PyObject *keyb = PyTuple_GetItem(entry, 0), *index = PyTuple_GetItem(entry, 1);
    PyObject *new_dst = PyTuple_GetItem(entry, 2), *new_dport = PyTuple_GetItem(entry, 3);
    PyObject *take = PyTuple_GetItem(entry, 4);
    if (!PyBytes_Check(keyb) || PyBytes_Size(keyb) != 32 || !PyBytes_Check(new_dst)) return 0;
    t->key32 = (const unsigned char *)PyBytes_AsString(keyb);
    t->new_dst = PyBytes_Size(new_dst) == 4 ? (const unsigned char *)PyBytes_AsString(new_dst)
                                            : NULL;
    t->new_dport = t->new_dst ? (uint32_t)PyLong_AsLong(new_dport) : 0;
    t->index = (uint32_t)PyLong_AsUnsignedLong(index);
    if (PyErr_Occurred()) return -1;
    Py_INCREF(entry); /* take (or a replayed commit) may change the table */
    Lease *lease = PyTuple_Size(entry) == 7 ? lease_cell(entry, 5) : NULL;
    int r = lease == NULL ? 0
                          : lease_out(self, lease, take, PyTuple_GetItem(entry, 6), nbytes, now,
                                      segments, t);
    if (r != 0) {
        if (r < 0) Py_DECREF(entry);
        else t->entry = entry;
        return r;
    }
    if (replay(self) < 0) { /* rule 6: nothing owed when Python runs */
        Py_DECREF(entry);
        return -1;
    }
    PyObject *got = segments ? PyObject_CallFunction(take, "ndn", nbytes, now, segments)
                             : PyObject_CallFunction(take, "nd", nbytes, now);
    if (got == NULL || got == Py_None) {
        Py_XDECREF(got);
        Py_DECREF(entry);
        return got == NULL ? -1 : 0;
    }
    unsigned long long counter = 0;
    PyObject *ep = NULL;
    if (PyTuple_Check(got) && PyTuple_Size(got) >= 2) {
        counter = PyLong_AsUnsignedLongLong(PyTuple_GetItem(got, 0));
        ep = PyTuple_GetItem(got, 1);
    }
    if (ep == NULL || PyErr_Occurred()) {
        Py_DECREF(got);
        Py_DECREF(entry);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "take: (counter, endpoint, ...)");
        return -1;
    }
    t->entry = entry;
    t->ep = Py_NewRef(ep);
    t->counter = (uint64_t)counter;
    t->sa_ok = endpoint_sa(self, ep, &t->sa) == 0;
    if (lease != NULL && t->sa_ok) lease_grant(self, lease, got, 2, 1, now, 0, &t->sa);
    Py_DECREF(got);
    return 1;
}

/* Seal ``len`` plaintext bytes at ``p`` as the datagram of ``counter`` into ``out``; ``rekey``
 * 0: the context already holds the flow's key (seal_into: only the nonce changes). */
static int seal_one(Lane *self, const Taken *t, uint64_t counter, const unsigned char *p,
                    Py_ssize_t len, unsigned char *out, int rekey) {
    unsigned char nonce[12];
    build_header(out, t->index, counter);
    build_nonce(nonce, out);
    return seal_into(self->ctx, rekey ? t->key32 : NULL, nonce, out, HEADER_LEN, p, (int)len,
                     out + HEADER_LEN);
}

/* The end of lane_out: libcrypto failed (1: it did not) */
static int sealed_ok(int ok, Taken *t) {
    if (ok && !PyErr_Occurred()) return 1;
    ERR_clear_error();
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "Lane: libcrypto failed");
    taken_release(t);
    return 0;
}

/* A TSO super-packet (gso_type TCPV4, with or without ECN) of a learnt flow, ``len`` bytes
 * after its virtio-net header: core/express.py's ``_outbound_super``. Its headers are copied to
 * self->work (and translated there), its segments (core/batch.py rules 2-4,
 * ``fp_segment_rows``: those headers, the frame's payload) sealed one datagram each into
 * self->sealed, counters in order; *dsize: every datagram's size but the last's. Returns as
 * lane_out. */
static int lane_out_super(Lane *self, const unsigned char *frame, Py_ssize_t len, double now,
                          PyObject **endpoint, Py_ssize_t *dlen, Py_ssize_t *dsize) {
    unsigned char *p = self->work, key[13];
    uint16_t mss;
    memcpy(&mss, frame + 4, 2); /* gso_size, native order */
    memcpy(p, frame + VNET, (size_t)(len < 80 ? len : 80)); /* IPv4 20 + TCP at most 60 */
    if (!key13(p, len, key) || p[9] != TCP) return 0;
    Py_ssize_t thl = (p[32] >> 4) << 2, hlen = 20 + thl, payload = len - hlen;
    if (mss < 1 || hlen + mss > self->mtu) return 0;
    Py_ssize_t n = payload > 0 ? (payload - 1) / mss + 1 : 1;
    if (n > MAX_SEGMENTS) return 0;
    Taken t;
    int r = take_flow(self, key, n * hlen + payload, now, n, &t);
    if (r <= 0) return r;
    if (t.new_dst) rewrite(p, len, 1, t.new_dst, t.new_dport);
    Py_ssize_t stride = (hlen + mss + 3) & ~(Py_ssize_t)3, pos = 0;
    fp_segment_rows(p, frame + VNET + hlen, 20, thl, len, mss, self->segs, n, stride);
    int ok = 1;
    for (Py_ssize_t i = 0; i < n && ok; i++) {
        Py_ssize_t rlen = i < n - 1 ? hlen + mss : hlen + payload - (n - 1) * mss;
        ok = seal_one(self, &t, t.counter + (uint64_t)i, self->segs + i * stride, rlen,
                      self->sealed + pos, i == 0);
        pos += rlen + OVERHEAD;
    }
    if (!sealed_ok(ok, &t)) return -1;
    *dlen = pos;
    *dsize = hlen + mss + OVERHEAD;
    *endpoint = t.ep;
    self->out_sa = t.sa;
    self->out_sa_ok = t.sa_ok;
    Py_DECREF(t.entry);
    return 1;
}

/* 1: sealed into self->sealed (*dlen bytes: one datagram, or a super-packet's datagrams of
 * *dsize bytes but the last; *dsize 0 for one) for *endpoint (a new reference, or NULL under
 * a lease) at self->out_sa (out_sa_ok 0: not an IPv4 endpoint); 0: not the lane's, nothing
 * changed; -1: an exception (a bug in take, or no memory). */
static int lane_out(Lane *self, const unsigned char *frame, Py_ssize_t n, double now,
                    PyObject **endpoint, Py_ssize_t *dlen, Py_ssize_t *dsize) {
    *dsize = 0;
    if (n < VNET + 28 || n > VNET + BUF) return 0;
    Py_ssize_t len = n - VNET;
    if ((frame[1] & ~GSO_ECN) == GSO_TCPV4)
        return lane_out_super(self, frame, len, now, endpoint, dlen, dsize);
    if (frame[1] != 0) return 0; /* another gso_type */
    unsigned char *p = self->work;
    memcpy(p, frame + VNET, (size_t)len);
    uint16_t flags = frame[0], start, offset;
    memcpy(&start, frame + 6, 2); /* native order, as the kernel writes them */
    memcpy(&offset, frame + 8, 2);
    unsigned char key[13];
    if (!key13(p, len, key) || len > self->mtu) return 0;
    if (flags & 1) { /* NEEDS_CSUM: core/batch.py _complete */
        Py_ssize_t at = (Py_ssize_t)start + offset;
        if (start < 20 || at + 2 > len) return 0;
        uint64_t s = ones_sum(p, start, len);
        uint32_t ck = (uint32_t)((0xFFFF - s) % 0xFFFF);
        if (ck == 0 && p[9] == UDP) ck = 0xFFFF;
        put16(p + at, ck);
    }
    Taken t;
    int r = take_flow(self, key, len, now, 0, &t);
    if (r <= 0) return r;
    if (t.new_dst) rewrite(p, len, 1, t.new_dst, t.new_dport);
    if (!sealed_ok(seal_one(self, &t, t.counter, p, len, self->sealed, 1), &t)) return -1;
    *dlen = len + OVERHEAD;
    *endpoint = t.ep;
    self->out_sa = t.sa;
    self->out_sa_ok = t.sa_ok;
    Py_DECREF(t.entry);
    return 1;
}

/* ---- in: one datagram -> one frame ------------------------------------------------------- */

/* The datagram header's index and counter (core/wire.py: little-endian) */
static uint32_t index_of(const unsigned char *d) {
    return (uint32_t)d[4] | (uint32_t)d[5] << 8 | (uint32_t)d[6] << 16 | (uint32_t)d[7] << 24;
}
static uint64_t counter_of(const unsigned char *d) {
    uint64_t counter = 0;
    for (int i = 7; i >= 0; i--) counter = counter << 8 | d[8 + i];
    return counter;
}

/* The ReplayWindow's ``top`` after window_update marked in its ring: 0, or -1 (an exception). */
static int set_top(PyObject *window, const Window *w) {
    PyObject *top = PyLong_FromUnsignedLongLong(w->top);
    int r = top == NULL ? -1 : PyObject_SetAttrString(window, "top", top);
    Py_XDECREF(top);
    return r;
}

/* A data message's session in ``slots`` (core/express.py rule 1), with its replay window,
 * kept until the call ends (forget_call): NULL if ``d`` (at least a data header) is not one
 * of a session in the tables, or on an exception. */
static struct SlotFound *slot_of(Lane *self, const unsigned char *d) {
    if (d[0] != 4 || d[1] || d[2] || d[3]) return NULL;
    uint32_t index = index_of(d);
    for (int i = 0; i < self->nslotf; i++)
        if (self->slotf[i].index == index) return &self->slotf[i];
    if (self->nslotf == SLOT_CAP && forget_call(self) < 0) return NULL;
    PyObject *iobj = PyLong_FromUnsignedLong(index);
    if (iobj == NULL) return NULL;
    PyObject *slot = PyDict_GetItem(self->slots, iobj);
    Py_DECREF(iobj);
    if (slot == NULL || !PyTuple_Check(slot) || PyTuple_Size(slot) != 4) return NULL;
    PyObject *keyb = PyTuple_GetItem(slot, 0);
    if (!PyBytes_Check(keyb) || PyBytes_Size(keyb) != 32) return NULL;
    struct SlotFound *f = &self->slotf[self->nslotf];
    f->limit = PyLong_AsUnsignedLongLong(PyTuple_GetItem(slot, 2));
    if (PyErr_Occurred()) return NULL;
    f->window = PyTuple_GetItem(slot, 1);
    if (get_window(f->window, &f->ring, &f->w) < 0) return NULL;
    f->index = index;
    f->key = (const unsigned char *)PyBytes_AsString(keyb);
    f->accept = PyTuple_GetItem(slot, 3);
    f->slot = Py_NewRef(slot);
    f->moved = 0;
    self->nslotf++;
    return f;
}

/* ``accept`` for ``count`` packets of ``entry`` (an ``inn`` entry) from ``addr`` (``from``:
 * its address, NULL: none) in a datagram of session ``index``: under the entry's lease, owed
 * (rule 6), else asked (what is owed replayed first) and, if granted, leased. 1: taken; 0:
 * refused, nothing changed; -1: an exception. */
static int admit_in(Lane *self, PyObject *accept, PyObject *entry, const unsigned char *src,
                    Py_ssize_t nbytes, PyObject **addr, const struct sockaddr_in *from,
                    uint32_t index, double now, Py_ssize_t count) {
    PyObject *refs = PyTuple_GetItem(entry, 2);
    Lease *l = from == NULL ? NULL : lease_cell(entry, 3);
    if (l != NULL && lease_holds(self, l, now) && l->index == index
        && l->addr == from->sin_addr.s_addr && l->port == from->sin_port) {
        if (record(self, accept, from, refs, nbytes, count, now) < 0) return -1;
        l->last = now;
        self->n_leased[1] += count;
        return 1;
    }
    if (replay(self) < 0) return -1;
    if (*addr == NULL && (*addr = addr_of(from)) == NULL) return -1;
    PyObject *srcb = PyBytes_FromStringAndSize((const char *)src, 4);
    PyObject *yes = srcb == NULL ? NULL
                                 : PyObject_CallFunction(accept, "OnOdOn", srcb, nbytes, *addr,
                                                         now, refs, count);
    Py_XDECREF(srcb);
    int ok = yes == NULL ? -1 : PyObject_IsTrue(yes);
    if (ok == 1 && l != NULL) lease_grant(self, l, yes, 0, 0, now, index, from);
    Py_XDECREF(yes);
    return ok;
}

/* 1: the frame (VNET zero bytes, then the packet) is in self->work, *flen bytes; 0: not the
 * lane's, nothing changed; -1: an exception. ``*addr``: the source as Python sees it, made
 * from ``from`` when first needed (NULL until then; the caller's reference). */
static int lane_in(Lane *self, const unsigned char *d, Py_ssize_t n, PyObject **addr,
                   const struct sockaddr_in *from, double now, Py_ssize_t *flen) {
    if (n < OVERHEAD + 28 || n > BUF) return 0;
    uint64_t counter = counter_of(d);
    struct SlotFound *sl = slot_of(self, d);
    if (sl == NULL) return PyErr_Occurred() ? -1 : 0;
    if (counter >= sl->limit || !window_check(&sl->w, counter)) return 0;
    Py_ssize_t plen = n - OVERHEAD;
    unsigned char *p = self->work + VNET, nonce[12];
    build_nonce(nonce, d);
    int verified = open_into(self->ctx, sl->key, nonce, d,
                             HEADER_LEN, d + HEADER_LEN, (int)(n - HEADER_LEN), p);
    if (verified < 0) {
        ERR_clear_error();
        PyErr_SetString(PyExc_RuntimeError, "Lane: libcrypto failed");
        return -1;
    }
    unsigned char key[13];
    if (!verified || !key13(p, plen, key) || memcmp(p + 16, self->pod4, 4) != 0) return 0;
    PyObject *entry = lookup(self, 1, key);
    if (entry == NULL) return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_Check(entry) || PyTuple_Size(entry) < 3) return 0;
    Py_INCREF(entry);
    PyObject *vip = PyTuple_GetItem(entry, 0), *vport = PyTuple_GetItem(entry, 1);
    int taken = admit_in(self, sl->accept, entry, p + 12, plen, addr, from, index_of(d), now, 1);
    if (taken == 1) {
        window_update(&sl->w, counter);
        sl->moved = 1;
        if (PyBytes_Check(vip) && PyBytes_Size(vip) == 4)
            rewrite(p, plen, 0, (const unsigned char *)PyBytes_AsString(vip),
                    (uint32_t)PyLong_AsLong(vport));
        memset(self->work, 0, VNET);
        *flen = VNET + plen;
    }
    Py_DECREF(entry);
    return taken;
}

/* ---- in: a GRO read of several datagrams -> the frames of their coalesced packets --------- */

/* core/express.py's ``inbound_run`` (rule 2b): ``n`` bytes of datagrams of ``size`` bytes
 * (the last may be shorter), 2 to MAX_SEGMENTS of them, every one of one session, in counter
 * order, each passing lane_in's checks (else: 0, nothing changed). Then per group of
 * consecutive datagrams of one flow, in order: one ``accept`` for the group, the window marked
 * for each, and the daemon's _inject: coalesced (partial checksums), the reply's translation,
 * the TSO header; a group the lane has no entry for, or ``accept`` refuses, stops there.
 * Returns the datagrams taken (a prefix; their frames are in self->frames, self->nframes of
 * them, self->frame_len each; the rest unchanged), or -1: an exception. */
static Py_ssize_t lane_in_run(Lane *self, const unsigned char *d, Py_ssize_t n,
                              Py_ssize_t size, PyObject **addr, const struct sockaddr_in *from,
                              double now) {
    Py_ssize_t k = size > 0 ? (n + size - 1) / size : 0;
    self->nframes = 0;
    if (size < OVERHEAD + 28 || k < 2 || k > MAX_SEGMENTS || n > BUF) return 0;
    struct SlotFound *sl = slot_of(self, d);
    if (sl == NULL) return PyErr_Occurred() ? -1 : 0;
    unsigned long long limit = sl->limit;
    Window *w = &sl->w;
    Py_ssize_t result = 0, taken = 0, pos = 0;
    unsigned char keys[MAX_SEGMENTS][13], nonce[12];
    uint64_t counters[MAX_SEGMENTS];
    Piece pieces[MAX_SEGMENTS];
    for (Py_ssize_t i = 0; i < k; i++) { /* 1. every check, nothing changed */
        const unsigned char *di = d + i * size;
        Py_ssize_t dn = i < k - 1 ? size : n - (k - 1) * size, plen = dn - OVERHEAD;
        if (dn < OVERHEAD + 28 || memcmp(di, d, 8) != 0) return 0; /* word and index */
        uint64_t counter = counter_of(di);
        if (counter >= limit || (i && counter <= counters[i - 1]) || !window_check(w, counter))
            return 0;
        counters[i] = counter;
        unsigned char *p = self->plain + i * size;
        build_nonce(nonce, di);
        const unsigned char *kb = i ? NULL : sl->key;
        int verified = open_into(self->ctx, kb, nonce, di, HEADER_LEN, di + HEADER_LEN,
                                 (int)(dn - HEADER_LEN), p); /* the key once per read */
        if (verified < 0) {
            ERR_clear_error();
            PyErr_SetString(PyExc_RuntimeError, "Lane: libcrypto failed");
            return -1;
        }
        if (!verified || !key13(p, plen, keys[i]) || memcmp(p + 16, self->pod4, 4) != 0)
            return 0;
        pieces[i].buf = p;
        pieces[i].len = plen;
    }
    while (taken < k) { /* 2. a group of one flow at a time */
        Py_ssize_t end = taken + 1, total = pieces[taken].len;
        for (; end < k && memcmp(keys[end], keys[taken], 13) == 0; end++) total += pieces[end].len;
        PyObject *entry = lookup(self, 1, keys[taken]);
        if (entry == NULL && PyErr_Occurred()) return -1;
        if (entry == NULL || !PyTuple_Check(entry) || PyTuple_Size(entry) < 3) break;
        Py_INCREF(entry);
        PyObject *vip = PyTuple_GetItem(entry, 0), *vport = PyTuple_GetItem(entry, 1);
        int ok = admit_in(self, sl->accept, entry, pieces[taken].buf + 12, total, addr, from,
                          index_of(d), now, end - taken);
        if (ok != 1) { /* accept: the state changes of the group's packets, or none */
            Py_DECREF(entry);
            if (ok < 0) result = -1;
            break;
        }
        for (Py_ssize_t i = taken; i < end; i++) window_update(w, counters[i]); /* 3. */
        sl->moved = 1;
        /* 4. _inject: coalesce, then per packet the reply's translation and its TSO header */
        Py_ssize_t lens[MAX_SEGMENTS], gsos[MAX_SEGMENTS];
        Py_ssize_t m = fp_coalesce_into(pieces + taken, end - taken, 1, VNET, self->frames + pos,
                                        lens, gsos);
        int translate = PyBytes_Check(vip) && PyBytes_Size(vip) == 4;
        uint32_t port = translate ? (uint32_t)PyLong_AsLong(vport) : 0;
        for (Py_ssize_t j = 0; j < m; j++) { /* each packet after its virtio-net header's room */
            unsigned char *f = self->frames + pos, *p = f + VNET;
            if (translate)
                rewrite(p, lens[j], 0, (const unsigned char *)PyBytes_AsString(vip), port);
            memset(f, 0, VNET);
            if (gsos[j]) { /* core/batch.py rewrite_partial_csum and build_gso_vnet_hdr */
                fp_partial_csum(p, lens[j], 20);
                uint16_t hdr_len = (uint16_t)(20 + ((p[32] >> 4) << 2)), gso = (uint16_t)gsos[j];
                uint16_t start = 20, offset = 16;
                f[0] = 1; /* NEEDS_CSUM */
                f[1] = GSO_TCPV4;
                memcpy(f + 2, &hdr_len, 2);
                memcpy(f + 4, &gso, 2);
                memcpy(f + 6, &start, 2);
                memcpy(f + 8, &offset, 2);
            }
            self->frame_len[self->nframes++] = VNET + lens[j];
            pos += VNET + lens[j];
        }
        Py_DECREF(entry);
        taken = end;
    }
    return result == 0 ? taken : result;
}

/* ---- endpoints ---------------------------------------------------------------------------- */

/* An (host, port) tuple's IPv4 address: 0, or -1 (not one; no exception). */
static int parse_sa(PyObject *ep, struct sockaddr_in *sa) {
    PyObject *host = PyTuple_Check(ep) && PyTuple_Size(ep) == 2 ? PyTuple_GetItem(ep, 0) : NULL;
    if (host == NULL || !PyUnicode_Check(host)) return -1;
    const char *text = PyUnicode_AsUTF8AndSize(host, NULL);
    long port = PyLong_AsLong(PyTuple_GetItem(ep, 1));
    if (text == NULL || PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, text, &sa->sin_addr) != 1) return -1;
    return 0;
}

static int endpoint_sa(Lane *self, PyObject *ep, struct sockaddr_in *sa) {
    if (ep == self->last_ep) {
        *sa = self->last_sa;
        return 0;
    }
    if (parse_sa(ep, sa) < 0) return -1;
    Py_XDECREF(self->last_ep);
    self->last_ep = Py_NewRef(ep);
    self->last_sa = *sa;
    return 0;
}

static PyObject *addr_of(const struct sockaddr_in *sa) {
    char text[INET_ADDRSTRLEN];
    if (inet_ntop(AF_INET, &sa->sin_addr, text, sizeof(text)) == NULL) text[0] = 0;
    return Py_BuildValue("(si)", text, (int)ntohs(sa->sin_port));
}

/* ---- methods ------------------------------------------------------------------------------- */

static PyObject *lane_outbound_impl(Lane *self, PyObject *args) {
    Py_buffer frame;
    double now;
    if (!PyArg_ParseTuple(args, "y*d:outbound", &frame, &now)) return NULL;
    PyObject *ep = NULL;
    Py_ssize_t dlen = 0, dsize = 0;
    int r = lane_out(self, frame.buf, frame.len, now, &ep, &dlen, &dsize);
    PyBuffer_Release(&frame);
    if (r < 0) return NULL;
    if (r == 0) Py_RETURN_NONE;
    if (ep == NULL) ep = addr_of(&self->out_sa); /* leased: the endpoint as granted */
    if (ep == NULL) return NULL;
    return Py_BuildValue("(y#N)", (const char *)self->sealed, dlen, ep);
}

static PyObject *lane_inbound_impl(Lane *self, PyObject *args) {
    Py_buffer d;
    PyObject *addr;
    double now;
    if (!PyArg_ParseTuple(args, "y*Od:inbound", &d, &addr, &now)) return NULL;
    Py_ssize_t flen = 0;
    PyObject *source = addr; /* borrowed: never replaced (it is not NULL) */
    int r = lane_in(self, d.buf, d.len, &source, NULL, now, &flen); /* one call: no lease */
    PyBuffer_Release(&d);
    if (r < 0) return NULL;
    if (r == 0) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)self->work, flen);
}

/* linux/gso.py UdpBatch.send_batch for a super-packet's datagrams (``len`` bytes, ``size``
 * each but the last) to ``sa``: UDP GSO sends (``UDP_SEGMENT``) of at most max_segments each;
 * where the socket refuses GSO (EIO, EINVAL, EMSGSIZE, ENOPROTOOPT), one sendto per datagram.
 * Returns the datagrams the kernel took; it stops at the first it did not take (a full
 * buffer: the rest are the caller's send drops, as the Python path counts them). */
static Py_ssize_t send_run(int fd, const unsigned char *data, Py_ssize_t len, Py_ssize_t size,
                           const struct sockaddr_in *sa) {
    Py_ssize_t per = UDP_MAX_PAYLOAD / size, sent = 0, pos = 0;
    if (per > MAX_SEGMENTS) per = MAX_SEGMENTS;
    if (per < 1) per = 1;
    while (pos < len) {
        Py_ssize_t chunk = len - pos < per * size ? len - pos : per * size;
        Py_ssize_t count = (chunk + size - 1) / size;
        if (count > 1) {
            char control[CMSG_SPACE(sizeof(uint16_t))];
            memset(control, 0, sizeof(control));
            struct iovec iov = {(void *)(data + pos), (size_t)chunk};
            struct msghdr msg = {.msg_name = (void *)sa, .msg_namelen = sizeof(*sa),
                                 .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                                 .msg_controllen = sizeof(control)};
            struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
            cm->cmsg_level = SOL_UDP;
            cm->cmsg_type = UDP_SEGMENT;
            cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t gso = (uint16_t)size;
            memcpy(CMSG_DATA(cm), &gso, sizeof(gso));
            if (sendmsg(fd, &msg, 0) >= 0) {
                sent += count;
                pos += chunk;
                continue;
            }
            if (errno != EIO && errno != EINVAL && errno != EMSGSIZE && errno != ENOPROTOOPT)
                return sent;
        }
        for (Py_ssize_t at = 0; at < chunk; at += size) {
            size_t one = (size_t)(chunk - at < size ? chunk - at : size);
            if (sendto(fd, data + pos + at, one, 0, (const struct sockaddr *)sa, sizeof(*sa)) < 0)
                return sent;
            sent++;
        }
        pos += chunk;
    }
    return sent;
}

static PyObject *lane_inbound_run_impl(Lane *self, PyObject *args) {
    Py_buffer d;
    PyObject *addr;
    Py_ssize_t size;
    double now;
    if (!PyArg_ParseTuple(args, "y*nOd:inbound_run", &d, &size, &addr, &now)) return NULL;
    PyObject *source = addr; /* borrowed: never replaced (it is not NULL) */
    Py_ssize_t taken = lane_in_run(self, d.buf, d.len, size, &source, NULL, now);
    PyBuffer_Release(&d);
    if (taken < 0) return NULL;
    if (taken == 0) Py_RETURN_NONE;
    PyObject *frames = PyList_New(self->nframes);
    const unsigned char *f = self->frames;
    for (Py_ssize_t j = 0; frames != NULL && j < self->nframes; f += self->frame_len[j++]) {
        PyObject *one = PyBytes_FromStringAndSize((const char *)f, self->frame_len[j]);
        if (one == NULL) Py_CLEAR(frames);
        else if (PyList_SetItem(frames, j, one) < 0) Py_CLEAR(frames);
    }
    return frames == NULL ? NULL : Py_BuildValue("(Nn)", frames, taken);
}

/* One pump of tenc0 (``pump_tun``): the frames handed back in a new list, or NULL (an
 * exception); ``*dropped``: datagrams the socket refused. */
static PyObject *pump_tun(Lane *self, int tun_fd, int udp_fd, double now, Py_ssize_t limit,
                          Py_ssize_t lone, Py_ssize_t *dropped_out) {
    PyObject *back = PyList_New(0);
    if (back == NULL) return NULL;
    Py_ssize_t dropped = 0;
    for (Py_ssize_t i = 0; i < limit; i++) {
        ssize_t n = read(tun_fd, self->rbuf, VNET + BUF);
        if (n <= 0) break;
        PyObject *ep = NULL;
        Py_ssize_t dlen = 0, dsize = 0;
        int r = lane_out(self, self->rbuf, n, now, &ep, &dlen, &dsize);
        if (r < 0) {
            Py_DECREF(back);
            return NULL;
        }
        if (r == 0) {
            PyObject *frame = PyBytes_FromStringAndSize((const char *)self->rbuf, n);
            if (frame == NULL || PyList_Append(back, frame) < 0) {
                Py_XDECREF(frame);
                Py_DECREF(back);
                return NULL;
            }
            Py_DECREF(frame);
            break;
        }
        struct sockaddr_in sa = self->out_sa;
        Py_ssize_t count = dsize ? (dlen + dsize - 1) / dsize : 1;
        if (!self->out_sa_ok)
            dropped += count;
        else if (dsize)
            dropped += count - send_run(udp_fd, self->sealed, dlen, dsize, &sa);
        else if (sendto(udp_fd, self->sealed, (size_t)dlen, 0, (struct sockaddr *)&sa, sizeof(sa))
                 < 0)
            dropped++;
        self->n_sealed += count;
        self->n_bulk += dsize != 0;
        Py_XDECREF(ep);
        if (i == 0 && n <= lone) break;
    }
    *dropped_out = dropped;
    return back;
}

/* What ``wait`` kept for descriptor ``i`` (``back``), as its pump returns it: handed back
 * first, nothing read; NULL if nothing is kept. */
static PyObject *pop_kept(Lane *self, int i) {
    PyObject *back = self->back[i];
    if (back == NULL) return NULL;
    self->back[i] = NULL;
    return Py_BuildValue("(Nn)", back, self->back_n[i]);
}

static PyObject *lane_pump_tun_impl(Lane *self, PyObject *args) {
    int tun_fd, udp_fd;
    double now;
    Py_ssize_t limit, lone, dropped = 0;
    if (!PyArg_ParseTuple(args, "iidnn:pump_tun", &tun_fd, &udp_fd, &now, &limit, &lone))
        return NULL;
    if (self->back[1] != NULL) return pop_kept(self, 1);
    PyObject *back = pump_tun(self, tun_fd, udp_fd, now, limit, lone, &dropped);
    if (back == NULL) return NULL;
    return Py_BuildValue("(Nn)", back, dropped);
}

/* One pump of the UDP socket (``pump_udp``): the reads handed back in a new list, or NULL;
 * ``*errors``: frames tenc0 refused. */
static PyObject *pump_udp(Lane *self, int udp_fd, int tun_fd, double now, Py_ssize_t limit,
                          Py_ssize_t lone, Py_ssize_t *errors_out) {
    PyObject *back = PyList_New(0);
    if (back == NULL) return NULL;
    Py_ssize_t errors = 0;
    for (Py_ssize_t i = 0; i < limit; i++) {
        struct sockaddr_in sa;
        struct iovec iov = {self->rbuf, BUF};
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } control;
        struct msghdr msg = {0};
        msg.msg_name = &sa;
        msg.msg_namelen = sizeof(sa);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof(control.buf);
        ssize_t n = recvmsg(udp_fd, &msg, 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
            /* e.g. an ICMP error reported on the socket: as _on_udp, go on reading */
            continue;
        }
        int gro = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO
                && c->cmsg_len >= CMSG_LEN(sizeof(int)))
                memcpy(&gro, CMSG_DATA(c), sizeof(int));
        int trunc = (msg.msg_flags & MSG_TRUNC) != 0;
        PyObject *addr = NULL; /* the source as Python sees it: made only if Python needs it */
        int run = gro > 0 && gro < n;
        Py_ssize_t r = 0, flen = 0, k = run ? (n + gro - 1) / gro : 1;
        if (!trunc && msg.msg_namelen == sizeof(sa) && sa.sin_family == AF_INET)
            r = run ? lane_in_run(self, self->rbuf, n, gro, &addr, &sa, now) /* taken */
                    : lane_in(self, self->rbuf, n, &addr, &sa, now, &flen);
        if (r >= 0 && r < k && addr == NULL && (addr = addr_of(&sa)) == NULL) r = -1;
        if (r < 0) {
            Py_XDECREF(addr);
            Py_DECREF(back);
            return NULL;
        }
        if (run && r > 0) { /* the groups taken, in order */
            const unsigned char *f = self->frames;
            for (Py_ssize_t j = 0; j < self->nframes; f += self->frame_len[j++])
                if (write(tun_fd, f, (size_t)self->frame_len[j]) < 0) errors++;
            self->n_opened += r;
            self->n_bulk++;
        } else if (r > 0) {
            if (write(tun_fd, self->work, (size_t)flen) < 0) errors++;
            self->n_opened++;
        }
        if (r < k) { /* what was not taken (all of it, or a GRO read's rest) goes back */
            Py_ssize_t at = r * gro; /* r is 0 unless ``run`` */
            PyObject *item = Py_BuildValue("(y#iON)", (const char *)self->rbuf + at, n - at, gro,
                                           trunc ? Py_True : Py_False, addr);
            if (item == NULL || PyList_Append(back, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(back);
                return NULL;
            }
            Py_DECREF(item);
            break;
        }
        Py_XDECREF(addr);
        if (i == 0 && n <= lone) break;
    }
    *errors_out = errors;
    return back;
}

static PyObject *lane_pump_udp_impl(Lane *self, PyObject *args) {
    int udp_fd, tun_fd;
    double now;
    Py_ssize_t limit, lone, errors = 0;
    if (!PyArg_ParseTuple(args, "iidnn:pump_udp", &udp_fd, &tun_fd, &now, &limit, &lone))
        return NULL;
    if (self->back[0] != NULL) return pop_kept(self, 0);
    PyObject *back = pump_udp(self, udp_fd, tun_fd, now, limit, lone, &errors);
    if (back == NULL) return NULL;
    return Py_BuildValue("(Nn)", back, errors);
}

/* ---- wait: epoll that serves the lane's readiness itself ----------------------------------- */

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* One ready lane fd served inside ``wait``: 1 if Python must see it (something handed back or
 * counted, kept for its pump call), 0 if the lane took everything, -1 on an exception. */
static int serve(Lane *self, int is_tun, int tun_fd, int udp_fd, Py_ssize_t limit,
                 Py_ssize_t lone, double at, double quiet) {
    Py_ssize_t n = 0;
    double clock = monotonic();
    double now = at >= 0 ? at : clock;
    /* daemon.py READS: a reader served again within ``quiet`` is hot (a stream: the ACKs of
     * a bulk transfer) and reads until EAGAIN or ``limit``; a cold one stops after a lone
     * small packet, the next one being the next epoll call */
    if (clock - self->served[is_tun] <= quiet) lone = 0;
    self->served[is_tun] = clock;
    PyObject *back = is_tun ? pump_tun(self, tun_fd, udp_fd, now, limit, lone, &n)
                            : pump_udp(self, udp_fd, tun_fd, now, limit, lone, &n);
    if (back == NULL) return -1;
    if (PyList_Size(back) == 0 && n == 0) {
        Py_DECREF(back);
        return 0;
    }
    self->back[is_tun] = back;
    self->back_n[is_tun] = n;
    return 1;
}

/* epoll_wait, rounding a wait in seconds up to the millisecond (as select.epoll.poll); the
 * GIL released. */
static int epoll_for(int epfd, struct epoll_event *evs, int maxevents, double seconds) {
    int ms = seconds < 0 ? -1 : seconds == 0 ? 0 : (int)ceil(seconds * 1e3);
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = epoll_wait(epfd, evs, maxevents, ms);
    Py_END_ALLOW_THREADS
    return n;
}

/* Seconds from ``now`` to ``deadline`` (< 0: none, then -1), at least 0. */
static double left_until(double deadline, double now) {
    return deadline < 0 ? -1.0 : deadline > now ? deadline - now : 0.0;
}

/* linux/spin.py's ``SpinSelector.select`` (rules 1-3) for the lane's wait (rule 5): the same
 * window, budget and adaptation, counted on every event, whoever serves it. ``deadline``:
 * CLOCK_MONOTONIC seconds, or < 0 for none. Events (>= 0) or -1 (errno). */
static int epoll_spin(Lane *self, int epfd, struct epoll_event *evs, int maxevents,
                      double deadline) {
    double now = monotonic();
    double left = left_until(deadline, now);
    if (self->spin <= 0) return epoll_for(epfd, evs, maxevents, left); /* rule 4 */
    int n;
    if (now - self->last_event > self->spin && left != 0) { /* rule 1: idle, sleep at once */
        n = epoll_for(epfd, evs, maxevents, left);
        if (n > 0) self->last_event = monotonic();
        return n;
    }
    n = epoll_for(epfd, evs, maxevents, 0); /* rule 1 */
    if (n == 0 && left != 0) {              /* rule 2 */
        double until = self->last_event + self->budget;
        int cut = 0;
        if (deadline >= 0 && deadline <= until) {
            until = deadline;
            cut = 1;
        }
        int spun = now < until;
        while (n == 0 && now < until) {
            sched_yield();
            self->polls++;
            n = epoll_for(epfd, evs, maxevents, 0);
            now = monotonic();
        }
        if (spun && n == 0 && !cut) { /* rule 3: the window ran out */
            self->misses++;
            self->budget = self->budget / 2 >= self->spin / 64 ? self->budget / 2 : 0.0;
        }
        if (n == 0) {
            n = epoll_for(epfd, evs, maxevents, left_until(deadline, now));
            now = monotonic();
            if (n > 0 && now - self->last_event <= self->spin) { /* rule 3: a poll would have */
                double gap = now - self->last_event;
                self->grown++;
                double twice = 2 * (self->budget > gap ? self->budget : gap);
                self->budget = twice < self->spin ? twice : self->spin;
            }
        }
    }
    if (n > 0) self->last_event = now;
    return n;
}

static PyObject *lane_wait_impl(Lane *self, PyObject *args) {
    int epfd, maxevents, tun_fd, udp_fd, udp_ok;
    PyObject *timeout_obj, *now_obj = Py_None;
    Py_ssize_t limit, lone;
    double spin = 0.0, quiet = 0.0;
    if (!PyArg_ParseTuple(args, "iOiiipnn|Odd:wait", &epfd, &timeout_obj, &maxevents, &tun_fd,
                          &udp_fd, &udp_ok, &limit, &lone, &now_obj, &spin, &quiet))
        return NULL;
    double at = -1.0; /* None: each packet's ``now`` is CLOCK_MONOTONIC (time.monotonic) */
    if (now_obj != Py_None) {
        at = PyFloat_AsDouble(now_obj);
        if (at == -1.0 && PyErr_Occurred()) return NULL;
        if (at < 0) at = 0;
    }
    double timeout = -1.0; /* None: no limit */
    if (timeout_obj != Py_None) {
        timeout = PyFloat_AsDouble(timeout_obj);
        if (timeout == -1.0 && PyErr_Occurred()) return NULL;
        if (timeout < 0) timeout = 0;
    }
    if (spin != self->spin) { /* a new window: spin.py's start */
        self->spin = self->budget = spin > 0 ? spin : 0.0;
        self->last_event = -INFINITY;
    }
    if (maxevents < 1) maxevents = 1;
    if (maxevents > 64) maxevents = 64;
    struct epoll_event evs[64];
    double deadline = timeout < 0 ? -1.0 : monotonic() + timeout;
    for (;;) {
        double before = self->last_event;
        int n = epoll_spin(self, epfd, evs, maxevents, deadline);
        if (n < 0) {
            if (errno != EINTR) return PyErr_SetFromErrno(PyExc_OSError);
            if (before_python(self) < 0) return NULL; /* rule 6: the handlers are Python */
            if (PyErr_CheckSignals() < 0) return NULL;
            return PyList_New(0); /* the loop runs its signal handlers */
        }
        PyObject *ready = PyList_New(0);
        if (ready == NULL) return NULL;
        int sent_only = n > 0; /* every event: the lane sent a pod's packet to the network */
        Py_ssize_t bulk = self->n_bulk;
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            uint32_t ev = evs[i].events;
            int lane_fd = (fd == tun_fd && self->back[1] == NULL)
                          || (fd == udp_fd && udp_ok && self->back[0] == NULL);
            int r = 1;
            if (lane_fd && ev == EPOLLIN)
                r = serve(self, fd == tun_fd, tun_fd, udp_fd, limit, lone, at, quiet);
            if (r < 0) {
                Py_DECREF(ready);
                return NULL;
            }
            if (r != 0 || fd != tun_fd) sent_only = 0;
            if (r == 0) continue;
            PyObject *item = Py_BuildValue("(iI)", fd, ev);
            if (item == NULL || PyList_Append(ready, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(ready);
                return NULL;
            }
            Py_DECREF(item);
        }
        /* no window: its answer is a network round trip away, or a stream's next readiness
         * comes by itself (spin.py rule 5) */
        if (sent_only || self->n_bulk != bulk) self->last_event = before;
        /* nothing (the deadline), something for Python, or the deadline passed meanwhile */
        if (n == 0 || PyList_Size(ready) > 0 || (deadline >= 0 && monotonic() >= deadline))
            return ready;
        Py_DECREF(ready);
        self->n_woken++;
    }
}

static PyObject *lane_spin_stats(Lane *self, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("(nnnd)", self->polls, self->misses, self->grown, self->budget);
}

static PyObject *lane_counts(Lane *self, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("(nn)", self->n_sealed, self->n_opened);
}

static PyObject *lane_woken(Lane *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromSsize_t(self->n_woken);
}

/* ---- the type ------------------------------------------------------------------------------ */

static int lane_init(Lane *self, PyObject *args, PyObject *kwds) {
    PyObject *out, *inn, *slots;
    const char *pod;
    Py_ssize_t pod_len, mtu;
    (void)kwds;
    if (!PyArg_ParseTuple(args, "OOOy#n:Lane", &out, &inn, &slots, &pod, &pod_len, &mtu))
        return -1;
    if (!PyDict_Check(out) || !PyDict_Check(inn) || !PyDict_Check(slots) || pod_len != 4
        || mtu < 28 || mtu > BUF) {
        PyErr_SetString(PyExc_ValueError, "Lane(out, inn, slots: dicts, pod4: 4 bytes, mtu)");
        return -1;
    }
    Py_XDECREF(self->out);
    Py_XDECREF(self->inn);
    Py_XDECREF(self->slots);
    self->out = Py_NewRef(out);
    self->inn = Py_NewRef(inn);
    self->slots = Py_NewRef(slots);
    memcpy(self->pod4, pod, 4);
    self->mtu = mtu;
    self->last_event = self->served[0] = self->served[1] = -INFINITY;
    new_epoch(self);
    /* a super-packet's rows (mss + headers within the MTU) and their datagrams */
    Py_ssize_t segs = MAX_SEGMENTS * ((mtu + 3) & ~(Py_ssize_t)3);
    Py_ssize_t sealed = MAX_SEGMENTS * (mtu + OVERHEAD);
    if (sealed < BUF + OVERHEAD) sealed = BUF + OVERHEAD;
    if (segs > self->cap_segs) {
        PyMem_Free(self->segs);
        self->segs = PyMem_Malloc((size_t)segs);
        self->cap_segs = self->segs ? segs : 0;
    }
    if (sealed > self->cap_sealed) {
        PyMem_Free(self->sealed);
        self->sealed = PyMem_Malloc((size_t)sealed);
        self->cap_sealed = self->sealed ? sealed : 0;
    }
    if (self->segs == NULL || self->sealed == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (self->rbuf == NULL) {
        self->rbuf = PyMem_Malloc(VNET + BUF);
        self->work = PyMem_Malloc(VNET + BUF + OVERHEAD);
        self->plain = PyMem_Malloc(BUF);
        self->frames = PyMem_Malloc(BUF + MAX_SEGMENTS * VNET);
        self->ctx = EVP_CIPHER_CTX_new();
        if (self->rbuf == NULL || self->work == NULL || self->ctx == NULL || self->plain == NULL
            || self->frames == NULL
            || !EVP_CipherInit_ex(self->ctx, chacha, NULL, NULL, NULL, 1)) {
            ERR_clear_error();
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static void lane_dealloc(Lane *self) {
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    Py_XDECREF(self->out);
    Py_XDECREF(self->inn);
    Py_XDECREF(self->slots);
    Py_XDECREF(self->last_ep);
    Py_XDECREF(self->back[0]);
    Py_XDECREF(self->back[1]);
    for (Py_ssize_t i = 0; i < self->nlog; i++) { /* owed, never replayed: a lane dropped */
        Py_XDECREF(self->log[i].fn);
        Py_XDECREF(self->log[i].refs);
    }
    PyMem_Free(self->rbuf);
    PyMem_Free(self->work);
    PyMem_Free(self->sealed);
    PyMem_Free(self->segs);
    PyMem_Free(self->plain);
    PyMem_Free(self->frames);
    EVP_CIPHER_CTX_free(self->ctx);
    freefunc free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    free(self);
    Py_DECREF(tp);
}

/* ---- calls from Python: each a new epoch, nothing owed when it returns (rule 6) ---------- */

#define FROM_PYTHON(name)                                                                       \
    static PyObject *name(Lane *self, PyObject *args) {                                        \
        new_epoch(self);                                                                        \
        return finish(self, name##_impl(self, args));                                           \
    }
FROM_PYTHON(lane_outbound)
FROM_PYTHON(lane_inbound)
FROM_PYTHON(lane_inbound_run)
FROM_PYTHON(lane_pump_tun)
FROM_PYTHON(lane_pump_udp)
FROM_PYTHON(lane_wait)

static PyObject *lane_settle(Lane *self, PyObject *unused) {
    (void)unused;
    new_epoch(self);
    if (replay(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *lane_leased(Lane *self, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("(nn)", self->n_leased[0], self->n_leased[1]);
}

static PyMethodDef lane_methods[] = {
    {"outbound", (PyCFunction)lane_outbound, METH_VARARGS,
     "outbound(frame, now) -> (datagram, endpoint) | None: core/express.py Express.outbound"},
    {"inbound_run", (PyCFunction)lane_inbound_run, METH_VARARGS,
     "inbound_run(data, size, addr, now) -> ([frame], taken) | None: Express.inbound_run"},
    {"inbound", (PyCFunction)lane_inbound, METH_VARARGS,
     "inbound(datagram, addr, now) -> frame | None: core/express.py Express.inbound"},
    {"pump_tun", (PyCFunction)lane_pump_tun, METH_VARARGS,
     "pump_tun(tun_fd, udp_fd, now, limit, lone) -> ([frame handed back], send_dropped)"},
    {"pump_udp", (PyCFunction)lane_pump_udp, METH_VARARGS,
     "pump_udp(udp_fd, tun_fd, now, limit, lone) -> ([(data, gro_size, truncated, addr)], "
     "inject_errors)"},
    {"counts", (PyCFunction)lane_counts, METH_NOARGS,
     "counts() -> (sealed, opened): packets the pumps took out and in"},
    {"wait", (PyCFunction)lane_wait, METH_VARARGS,
     "wait(epfd, timeout, maxevents, tun_fd, udp_fd, udp_ok, limit, lone, now=None, spin=0, "
     "quiet=0) -> [(fd, events)]: epoll_wait that serves the lane's own readiness in C and "
     "returns what Python must see; now: the packets' time (None: CLOCK_MONOTONIC, "
     "time.monotonic); spin: linux/spin.py's polling window in seconds; quiet: a descriptor "
     "served again within it reads until EAGAIN (daemon.py READS)"},
    {"spin_stats", (PyCFunction)lane_spin_stats, METH_NOARGS,
     "spin_stats() -> (polls, misses, grown, budget): wait's polling window (spin.py rules)"},
    {"woken", (PyCFunction)lane_woken, METH_NOARGS,
     "woken() -> wake-ups wait served in C without returning to Python"},
    {"leased", (PyCFunction)lane_leased, METH_NOARGS,
     "leased() -> (out, in): packets admitted under a lease (core/express.py rule 6)"},
    {"settle", (PyCFunction)lane_settle, METH_NOARGS,
     "settle(): a new epoch; the state changes leased packets owe are made now (they are "
     "before every return to Python anyway)"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot lane_slots[] = {
    {Py_tp_init, (void *)lane_init},
    {Py_tp_dealloc, (void *)lane_dealloc},
    {Py_tp_methods, lane_methods},
    {Py_tp_new, (void *)PyType_GenericNew},
    {Py_tp_doc, "Lane(out, inn, slots, pod4, mtu): the express lane (core/express.py)"},
    {0, NULL},
};

static PyType_Spec lane_spec = {
    "tencrypt._fastpath.Lane", sizeof(Lane), 0, Py_TPFLAGS_DEFAULT, lane_slots,
};

int fp_add_lane(PyObject *module) {
    str_send_counter = PyUnicode_InternFromString("send_counter");
    str_commit = PyUnicode_InternFromString("commit");
    str_self = PyUnicode_InternFromString("__self__");
    if (str_send_counter == NULL || str_commit == NULL || str_self == NULL) return -1;
    PyObject *type = PyType_FromSpec(&lane_spec);
    if (type == NULL) return -1;
    if (PyModule_AddObject(module, "Lane", type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}
