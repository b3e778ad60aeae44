/* loadgen: an independent load client for the broker comparison (scripts/compare.sh).
 *
 * Written in C against the system libzmq and sharing no code with the Rust broker, so a
 * bug or a slowdown in the broker's own tooling cannot hide in its measurements. Pipelined
 * DEALER clients send [reqid(8), "", body] and check every reply, [reqid, "", "OK", body]
 * or [reqid, "", "ERR", code, message] (with --raw: [reqid, "", body]). Prints one JSON
 * object; exits 1 if a reply was lost or mismatched or nothing was answered, 2 on usage.
 *
 *   loadgen --endpoint tcp://127.0.0.1:5555 --clients 16 --window 16 --size 64 \
 *           --duration 5 --warmup 1 --threads 2 --cpu 0 [--raw] [--drain 2]
 *           [--curve-server-key Z85 --curve-public-key Z85 --curve-secret-key Z85]
 *
 * Clients are spread over --threads loop threads, each with its own libzmq context (one
 * I/O thread) and its own epoll loop. Throughput counts OK replies received in the measured
 * window (after --warmup); latency covers requests sent in it; the run then stops sending
 * and waits up to --drain seconds for what is outstanding, which is counted lost after
 * that. client_cpu_ratio (process CPU seconds per wall second over the measured window)
 * near client_cpus means the client, not the server, set the pace.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

/* ---- clocks ---------------------------------------------------------------------- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t deadline)
{
    struct timespec ts = {(time_t)(deadline / 1000000000u), (long)(deadline % 1000000000u)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static double rusage_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* ---- latency histogram --------------------------------------------------------------
 * HDR-style log-linear buckets over nanoseconds: exact below 128 ns, then 64 linear
 * sub-buckets per power of two (at most 1/64 = 1.6 % wide), up to 60 s. Recording is an
 * index computation and an increment, so it costs nothing next to a round trip. */

#define HIST_SUB_BITS 6
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_MAX_NS 60000000000ull
#define HIST_BUCKETS 2048

typedef struct {
    uint64_t counts[HIST_BUCKETS];
    uint64_t total;
    uint64_t max;
} hist_t;

static unsigned hist_index(uint64_t v)
{
    if (v > HIST_MAX_NS)
        v = HIST_MAX_NS;
    int msb = 63 - __builtin_clzll(v | 1);
    int e = msb > HIST_SUB_BITS ? msb - HIST_SUB_BITS : 0;
    return (unsigned)(HIST_SUB * (unsigned)e + (unsigned)(v >> e));
}

/* The highest value a bucket stands for (HdrHistogram's "highest equivalent value"). */
static uint64_t hist_high(unsigned idx)
{
    if (idx < 2 * HIST_SUB)
        return idx;
    unsigned e = (idx >> HIST_SUB_BITS) - 1;
    uint64_t m = idx - HIST_SUB * e;
    return ((m + 1) << e) - 1;
}

static void hist_record(hist_t *h, uint64_t v)
{
    h->counts[hist_index(v)]++;
    h->total++;
    if (v > h->max)
        h->max = v;
}

static void hist_merge(hist_t *into, const hist_t *from)
{
    for (unsigned i = 0; i < HIST_BUCKETS; i++)
        into->counts[i] += from->counts[i];
    into->total += from->total;
    if (from->max > into->max)
        into->max = from->max;
}

static double hist_percentile_us(const hist_t *h, double p)
{
    if (h->total == 0)
        return 0;
    uint64_t rank = (uint64_t)(p / 100.0 * (double)h->total + 0.999999);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            uint64_t v = hist_high(i);
            return (double)(v < h->max ? v : h->max) / 1000.0;
        }
    }
    return (double)h->max / 1000.0;
}

/* ---- configuration ------------------------------------------------------------------ */

typedef struct {
    const char *endpoint;
    int clients, window, threads, raw;
    size_t size;
    double duration, warmup, drain;
    const char *cpu;
    /* CURVE (Z85 text): the server's public key and this client's pair; all or none. */
    const char *curve_server, *curve_public, *curve_secret;
} config_t;

static config_t cfg = {"tcp://127.0.0.1:5555", 16, 16, 1, 0, 64, 5.0, 1.0, 2.0, NULL,
                       NULL, NULL, NULL};

/* Time bounds shared by all threads, fixed before they start. */
static uint64_t t_start, t_warm, t_end, t_drain_end;

/* Body pattern: a pseudo-random buffer read at a reqid-dependent offset, with the reqid
 * XORed into the first 8 bytes. A reply carrying another request's body, a shifted or a
 * truncated body all fail the byte-for-byte check. */
static uint8_t *pattern;
#define PATTERN_SLACK 256

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static void make_pattern(void)
{
    pattern = malloc(cfg.size + PATTERN_SLACK);
    if (!pattern) {
        perror("loadgen: malloc");
        exit(2);
    }
    uint64_t s = 0x2545f4914f6cdd1dull;
    for (size_t i = 0; i < cfg.size + PATTERN_SLACK; i++)
        pattern[i] = (uint8_t)(mix64(s + i) >> 56);
}

static void fill_body(uint8_t *dst, const uint8_t rid[8], uint64_t rid64)
{
    const uint8_t *src = pattern + (mix64(rid64) & (PATTERN_SLACK - 1));
    memcpy(dst, src, cfg.size);
    for (size_t i = 0; i < 8 && i < cfg.size; i++)
        dst[i] ^= rid[i];
}

static int body_ok(const uint8_t *got, size_t len, const uint8_t rid[8], uint64_t rid64)
{
    if (len != cfg.size)
        return 0;
    const uint8_t *src = pattern + (mix64(rid64) & (PATTERN_SLACK - 1));
    size_t head = cfg.size < 8 ? cfg.size : 8;
    for (size_t i = 0; i < head; i++)
        if (got[i] != (uint8_t)(src[i] ^ rid[i]))
            return 0;
    return memcmp(got + head, src + head, cfg.size - head) == 0;
}

/* ---- per-thread state --------------------------------------------------------------- */

/* reqid = client (u16) | slot (u16) | generation (u32), little-endian. The slot is the
 * window position, so "known and outstanding" is one array lookup, and the generation
 * tells a late duplicate from the request that now holds the slot. */
typedef struct {
    uint64_t sent_at;
    uint32_t gen;
    uint8_t busy;
} slot_t;

typedef struct {
    void *sock;
    uint16_t index;
    int outstanding;
    int ready;   /* may have replies: its fd fired, or it was not read to EAGAIN */
    int blocked; /* last send hit EAGAIN: wait for its fd */
    int *free_slots;
    int nfree;
    slot_t *slots;
} client_t;

#define MAX_CODES 16
#define CODE_LEN 48
typedef struct {
    char code[CODE_LEN];
    uint64_t n;
} code_count_t;

typedef struct {
    int id;
    pthread_t tid;
    void *ctx;
    client_t *clients;
    int nclients;
    hist_t hist;
    uint64_t sent, ok_total, ok_window, err_total, err_window;
    uint64_t bad_reqid, bad_frames, bad_status, bad_body, lost, send_fail;
    code_count_t codes[MAX_CODES + 1]; /* last entry collects the overflow */
    int ncodes;
    uint64_t cpu_at_warm, cpu_at_end;
    uint64_t waits; /* blocking epoll_waits: many means the client often had nothing to do */
    int setup_failed;
} worker_t;

static void count_code(worker_t *w, const void *data, size_t len)
{
    if (len >= CODE_LEN)
        len = CODE_LEN - 1;
    for (int i = 0; i < w->ncodes; i++)
        if (strlen(w->codes[i].code) == len && memcmp(w->codes[i].code, data, len) == 0) {
            w->codes[i].n++;
            return;
        }
    code_count_t *c = w->ncodes < MAX_CODES ? &w->codes[w->ncodes++] : &w->codes[MAX_CODES];
    if (c->code[0] == 0) {
        if (c == &w->codes[MAX_CODES])
            strcpy(c->code, "(other)");
        else
            memcpy(c->code, data, len);
    }
    c->n++;
}

/* Sends one request on a free slot. Returns 1 if sent, 0 if the socket would block. */
static int send_one(worker_t *w, client_t *c)
{
    int slot = c->free_slots[c->nfree - 1];
    slot_t *s = &c->slots[slot];
    uint32_t gen = s->gen + 1;
    uint8_t rid[8];
    rid[0] = (uint8_t)c->index;
    rid[1] = (uint8_t)(c->index >> 8);
    rid[2] = (uint8_t)slot;
    rid[3] = (uint8_t)(slot >> 8);
    memcpy(rid + 4, &gen, 4);
    uint64_t rid64;
    memcpy(&rid64, rid, 8);

    /* The first frame decides: with ZMQ_IMMEDIATE and the high-water mark checked per
     * message, once it is queued the rest of the message is too. */
    if (zmq_send(c->sock, rid, 8, ZMQ_SNDMORE | ZMQ_DONTWAIT) != 8) {
        if (errno != EAGAIN)
            w->send_fail++;
        return 0;
    }
    zmq_msg_t body;
    uint64_t t = now_ns();
    if (zmq_send(c->sock, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) != 0 ||
        zmq_msg_init_size(&body, cfg.size) != 0) {
        w->send_fail++;
    } else {
        fill_body(zmq_msg_data(&body), rid, rid64); /* written in place: one copy */
        if (zmq_msg_send(&body, c->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&body);
            w->send_fail++;
        }
    }
    /* Counted outstanding even if a later frame failed: such a request shows up as lost. */
    s->gen = gen;
    s->busy = 1;
    s->sent_at = t;
    c->nfree--;
    c->outstanding++;
    w->sent++;
    return 1;
}

#define MAX_FRAMES 8

/* Reads and checks every reply waiting on the socket. Returns how many were read. */
static int drain_replies(worker_t *w, client_t *c, zmq_msg_t *f)
{
    int got = 0;
    /* Replies read back to back were queued together: one clock reading per 16 of them
     * (a reading costs as much as checking a reply). */
    uint64_t t = now_ns();
    for (;;) {
        if (zmq_msg_recv(&f[0], c->sock, ZMQ_DONTWAIT) < 0)
            return got; /* EAGAIN, or ETERM at exit */
        if (++got % 16 == 0)
            t = now_ns();
        int n = 1;
        int overflow = 0;
        while (zmq_msg_more(&f[n - 1])) {
            zmq_msg_t *dst = n < MAX_FRAMES ? &f[n] : &f[MAX_FRAMES - 1];
            if (zmq_msg_recv(dst, c->sock, ZMQ_DONTWAIT) < 0) {
                overflow = 1; /* a multipart message arrives whole; treat as malformed */
                break;
            }
            if (n < MAX_FRAMES)
                n++;
            else
                overflow = 1;
        }

        /* Which request is this? */
        if (zmq_msg_size(&f[0]) != 8) {
            w->bad_reqid++;
            continue;
        }
        const uint8_t *rid = zmq_msg_data(&f[0]);
        uint16_t cidx = (uint16_t)(rid[0] | rid[1] << 8);
        int slot = rid[2] | rid[3] << 8;
        uint32_t gen;
        memcpy(&gen, rid + 4, 4);
        if (cidx != c->index || slot >= cfg.window || !c->slots[slot].busy ||
            c->slots[slot].gen != gen) {
            w->bad_reqid++;
            continue;
        }
        slot_t *s = &c->slots[slot];
        s->busy = 0;
        c->free_slots[c->nfree++] = slot;
        c->outstanding--;
        int in_window = t >= t_warm && t < t_end;
        if (s->sent_at >= t_warm)
            hist_record(&w->hist, t - s->sent_at);

        uint64_t rid64;
        memcpy(&rid64, rid, 8);
        if (overflow || n < 3 || zmq_msg_size(&f[1]) != 0) {
            w->bad_frames++;
            continue;
        }
        if (cfg.raw) {
            if (n != 3)
                w->bad_frames++;
            else if (!body_ok(zmq_msg_data(&f[2]), zmq_msg_size(&f[2]), rid, rid64))
                w->bad_body++;
            else {
                w->ok_total++;
                w->ok_window += in_window;
            }
            continue;
        }
        size_t slen = zmq_msg_size(&f[2]);
        const char *status = zmq_msg_data(&f[2]);
        if (slen == 2 && memcmp(status, "OK", 2) == 0) {
            if (n != 4)
                w->bad_frames++;
            else if (!body_ok(zmq_msg_data(&f[3]), zmq_msg_size(&f[3]), rid, rid64))
                w->bad_body++;
            else {
                w->ok_total++;
                w->ok_window += in_window;
            }
        } else if (slen == 3 && memcmp(status, "ERR", 3) == 0 && n >= 4) {
            w->err_total++;
            if (in_window) {
                w->err_window++;
                count_code(w, zmq_msg_data(&f[3]), zmq_msg_size(&f[3]));
            }
        } else {
            w->bad_status++;
        }
    }
}

/* Fills the client's free window slots. Returns how many requests went out. */
static int fill_window(worker_t *w, client_t *c)
{
    int sent = 0;
    while (c->nfree > 0) {
        if (!send_one(w, c)) {
            c->blocked = 1;
            break;
        }
        sent++;
    }
    return sent;
}

/* The loop waits on each socket's ZMQ_FD with epoll instead of zmq_poll: zmq_poll costs a
 * syscall per socket on every call, and so does a receive that finds nothing, and those
 * syscalls were about 40 % of this thread's CPU. ZMQ_FD is edge-like: it fires when the socket
 * gets a command (a pipe became readable or writable, a connection came or went), and
 * only once the socket has processed all earlier ones. A socket is therefore read when its
 * fd fires and then until EAGAIN, and after every send it is read once more, because a
 * send may process the command whose wake-up we would otherwise wait for forever. */
static void *worker_main(void *arg)
{
    worker_t *w = arg;
    zmq_msg_t frames[MAX_FRAMES];
    for (int i = 0; i < MAX_FRAMES; i++)
        zmq_msg_init(&frames[i]);
    struct epoll_event *events = calloc((size_t)w->nclients, sizeof *events);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (!events || ep < 0) {
        w->setup_failed = 1;
        return NULL;
    }
    for (int i = 0; i < w->nclients; i++) {
        client_t *c = &w->clients[i];
        int fd;
        size_t len = sizeof fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (zmq_getsockopt(c->sock, ZMQ_FD, &fd, &len) != 0 ||
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
            w->setup_failed = 1;
            return NULL;
        }
        c->ready = 1;
    }
    int warm_seen = 0, draining = 0;
    uint64_t last_retry = 0;

    for (;;) {
        uint64_t now = now_ns();
        if (!warm_seen && now >= t_warm) {
            warm_seen = 1;
            w->cpu_at_warm = thread_cpu_ns();
        }
        if (!draining && now >= t_end) {
            draining = 1;
            w->cpu_at_end = thread_cpu_ns();
        }
        if (draining) {
            int left = 0;
            for (int i = 0; i < w->nclients; i++)
                left += w->clients[i].outstanding;
            if (left == 0 || now >= t_drain_end)
                break;
        }

        /* One pass over the sockets that may have something: read all replies, refill
         * the window (sends go out in a batch), read once more after sending. */
        int progress = 0;
        for (int i = 0; i < w->nclients; i++) {
            client_t *c = &w->clients[i];
            if (!c->ready)
                continue;
            c->ready = 0;
            progress += drain_replies(w, c, frames);
            if (!draining && !c->blocked && c->nfree > 0) {
                progress += fill_window(w, c);
                int more = drain_replies(w, c, frames);
                progress += more;
                c->ready = more > 0; /* freed slots: come back to refill them */
            }
        }

        /* Wait for a socket's fd, or only look (timeout 0) while there is work. A socket
         * that could not send (no connection yet) is retried every 10 ms as well: the
         * command that makes it writable may have been processed without a wake-up. */
        uint64_t next = !warm_seen ? t_warm : !draining ? t_end : t_drain_end;
        int any_blocked = 0;
        for (int i = 0; i < w->nclients; i++)
            any_blocked |= w->clients[i].blocked;
        now = now_ns();
        int timeout_ms = 0;
        if (!progress) {
            timeout_ms = next > now ? (int)((next - now + 999999) / 1000000) : 0;
            if (timeout_ms > (any_blocked ? 10 : 100))
                timeout_ms = any_blocked ? 10 : 100;
            w->waits++;
        }
        int n = epoll_wait(ep, events, w->nclients, timeout_ms);
        if (n < 0 && errno != EINTR)
            break;
        for (int k = 0; k < n; k++) {
            client_t *c = &w->clients[events[k].data.u32];
            c->ready = 1;
            c->blocked = 0; /* maybe writable again: try */
        }
        if (any_blocked && now_ns() - last_retry >= 10000000u) {
            last_retry = now_ns();
            for (int i = 0; i < w->nclients; i++)
                if (w->clients[i].blocked) {
                    w->clients[i].blocked = 0;
                    w->clients[i].ready = 1;
                }
        }
    }
    if (!draining)
        w->cpu_at_end = thread_cpu_ns();
    for (int i = 0; i < w->nclients; i++)
        w->lost += (uint64_t)w->clients[i].outstanding;
    for (int i = 0; i < MAX_FRAMES; i++)
        zmq_msg_close(&frames[i]);
    close(ep);
    free(events);
    return NULL;
}

/* ---- setup and report --------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen [--endpoint E] [--clients N] [--window W] [--size BYTES]\n"
            "               [--duration S] [--warmup S] [--drain S] [--threads T]\n"
            "               [--cpu LIST] [--raw]\n"
            "               [--curve-server-key Z85 --curve-public-key Z85 --curve-secret-key Z85]\n");
    exit(2);
}

static int pin_to(const char *list)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    char *copy = strdup(list), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *end;
        long cpu = strtol(tok, &end, 10);
        if (*end || cpu < 0 || cpu >= CPU_SETSIZE) {
            free(copy);
            return -1;
        }
        CPU_SET((int)cpu, &set);
    }
    free(copy);
    return sched_setaffinity(0, sizeof set, &set);
}

static double num_arg(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (*end == 's' && end[1] == 0)
        end++; /* accept "5s" as well as "5" */
    if (*end || v < 0)
        usage();
    return v;
}

static void parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--raw")) {
            cfg.raw = 1;
            continue;
        }
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--endpoint"))
            cfg.endpoint = v;
        else if (!strcmp(a, "--clients"))
            cfg.clients = (int)num_arg(v);
        else if (!strcmp(a, "--window"))
            cfg.window = (int)num_arg(v);
        else if (!strcmp(a, "--size"))
            cfg.size = (size_t)num_arg(v);
        else if (!strcmp(a, "--duration"))
            cfg.duration = num_arg(v);
        else if (!strcmp(a, "--warmup"))
            cfg.warmup = num_arg(v);
        else if (!strcmp(a, "--drain"))
            cfg.drain = num_arg(v);
        else if (!strcmp(a, "--threads"))
            cfg.threads = (int)num_arg(v);
        else if (!strcmp(a, "--cpu"))
            cfg.cpu = v;
        else if (!strcmp(a, "--curve-server-key"))
            cfg.curve_server = v;
        else if (!strcmp(a, "--curve-public-key"))
            cfg.curve_public = v;
        else if (!strcmp(a, "--curve-secret-key"))
            cfg.curve_secret = v;
        else
            usage();
    }
    if (cfg.clients < 1 || cfg.clients > 65535 || cfg.window < 1 || cfg.window > 65535 ||
        cfg.threads < 1 || cfg.duration <= 0)
        usage();
    if (cfg.threads > cfg.clients)
        cfg.threads = cfg.clients;
    int curve = !!cfg.curve_server + !!cfg.curve_public + !!cfg.curve_secret;
    if (curve != 0 && curve != 3)
        usage();
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    /* Pin before any thread exists so libzmq's I/O threads inherit the mask. */
    if (cfg.cpu && pin_to(cfg.cpu) != 0) {
        fprintf(stderr, "loadgen: cannot pin to CPU %s\n", cfg.cpu);
        return 2;
    }
    /* Keep freed message buffers in the heap: with 64 KiB bodies, returning them to the
     * kernel and faulting them back in was a visible part of the client's CPU. */
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    make_pattern();

    worker_t *ws = calloc((size_t)cfg.threads, sizeof *ws);
    if (!ws) {
        perror("loadgen: calloc");
        return 2;
    }
    /* One context (one I/O thread) per loop thread: threads share nothing. */
    for (int t = 0; t < cfg.threads; t++) {
        ws[t].id = t;
        ws[t].ctx = zmq_ctx_new();
        ws[t].clients = calloc((size_t)cfg.clients, sizeof(client_t));
        if (!ws[t].ctx || !ws[t].clients) {
            fprintf(stderr, "loadgen: context: %s\n", zmq_strerror(errno));
            return 2;
        }
    }
    for (int i = 0; i < cfg.clients; i++) {
        worker_t *w = &ws[i % cfg.threads];
        client_t *c = &w->clients[w->nclients++];
        c->index = (uint16_t)i;
        c->slots = calloc((size_t)cfg.window, sizeof(slot_t));
        c->free_slots = calloc((size_t)cfg.window, sizeof(int));
        c->sock = zmq_socket(w->ctx, ZMQ_DEALER);
        if (!c->slots || !c->free_slots || !c->sock) {
            fprintf(stderr, "loadgen: socket: %s\n", zmq_strerror(errno));
            return 2;
        }
        for (int s = 0; s < cfg.window; s++)
            c->free_slots[s] = cfg.window - 1 - s;
        c->nfree = cfg.window;
        int zero = 0, one = 1, ivl = 10, hwm = cfg.window * 4 + 16;
        /* IMMEDIATE: no request waits in a queue for a connection that may never come;
         * LINGER 0: exit never waits on a dead server. */
        zmq_setsockopt(c->sock, ZMQ_LINGER, &zero, sizeof zero);
        zmq_setsockopt(c->sock, ZMQ_IMMEDIATE, &one, sizeof one);
        zmq_setsockopt(c->sock, ZMQ_RECONNECT_IVL, &ivl, sizeof ivl);
        zmq_setsockopt(c->sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
        zmq_setsockopt(c->sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
        if (cfg.curve_server &&
            (zmq_setsockopt(c->sock, ZMQ_CURVE_SERVERKEY, cfg.curve_server, 40) != 0 ||
             zmq_setsockopt(c->sock, ZMQ_CURVE_PUBLICKEY, cfg.curve_public, 40) != 0 ||
             zmq_setsockopt(c->sock, ZMQ_CURVE_SECRETKEY, cfg.curve_secret, 40) != 0)) {
            fprintf(stderr, "loadgen: CURVE keys: %s\n", zmq_strerror(errno));
            return 2;
        }
        if (zmq_connect(c->sock, cfg.endpoint) != 0) {
            fprintf(stderr, "loadgen: connect %s: %s\n", cfg.endpoint, zmq_strerror(errno));
            return 2;
        }
    }

    t_start = now_ns();
    t_warm = t_start + (uint64_t)(cfg.warmup * 1e9);
    t_end = t_warm + (uint64_t)(cfg.duration * 1e9);
    t_drain_end = t_end + (uint64_t)(cfg.drain * 1e9);
    for (int t = 0; t < cfg.threads; t++)
        if (pthread_create(&ws[t].tid, NULL, worker_main, &ws[t]) != 0) {
            fprintf(stderr, "loadgen: pthread_create failed\n");
            return 2;
        }
    /* The process CPU over the measured window, including libzmq's I/O threads. */
    sleep_until(t_warm);
    double cpu0 = rusage_s();
    uint64_t w0 = now_ns();
    sleep_until(t_end);
    double cpu1 = rusage_s();
    uint64_t w1 = now_ns();
    for (int t = 0; t < cfg.threads; t++)
        pthread_join(ws[t].tid, NULL);
    for (int t = 0; t < cfg.threads; t++) {
        for (int i = 0; i < ws[t].nclients; i++)
            zmq_close(ws[t].clients[i].sock);
        zmq_ctx_term(ws[t].ctx);
    }

    hist_t *h = calloc(1, sizeof *h);
    worker_t sum = {0};
    code_count_t *codes = calloc((size_t)cfg.threads * (MAX_CODES + 1), sizeof *codes);
    int ncodes = 0;
    if (!h || !codes) {
        perror("loadgen: calloc");
        return 2;
    }
    double loop_cpu = 0;
    int setup_failed = 0;
    for (int t = 0; t < cfg.threads; t++) {
        worker_t *w = &ws[t];
        hist_merge(h, &w->hist);
        sum.sent += w->sent;
        sum.ok_total += w->ok_total;
        sum.ok_window += w->ok_window;
        sum.err_total += w->err_total;
        sum.err_window += w->err_window;
        sum.bad_reqid += w->bad_reqid;
        sum.bad_frames += w->bad_frames;
        sum.bad_status += w->bad_status;
        sum.bad_body += w->bad_body;
        sum.lost += w->lost;
        sum.send_fail += w->send_fail;
        sum.waits += w->waits;
        setup_failed |= w->setup_failed;
        if (w->cpu_at_end > w->cpu_at_warm && w->cpu_at_warm)
            loop_cpu += (double)(w->cpu_at_end - w->cpu_at_warm) / 1e9;
        for (int k = 0; k <= MAX_CODES; k++) {
            if (!w->codes[k].n)
                continue;
            int j = 0;
            while (j < ncodes && strcmp(codes[j].code, w->codes[k].code))
                j++;
            if (j == ncodes)
                codes[ncodes++] = w->codes[k];
            else
                codes[j].n += w->codes[k].n;
        }
    }
    double window_s = (double)(w1 - w0) / 1e9;
    uint64_t mismatched = sum.bad_reqid + sum.bad_frames + sum.bad_status + sum.bad_body;
    int ncpu = 0;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        ncpu = CPU_COUNT(&set);

    printf("{\"tool\":\"loadgen.c\",\"endpoint\":\"%s\",\"clients\":%d,\"window\":%d,"
           "\"size\":%zu,\"duration_s\":%g,\"warmup_s\":%g,\"drain_s\":%g,\"threads\":%d,"
           "\"raw\":%s,\"cpu\":\"%s\",",
           cfg.endpoint, cfg.clients, cfg.window, cfg.size, cfg.duration, cfg.warmup,
           cfg.drain, cfg.threads, cfg.raw ? "true" : "false", cfg.cpu ? cfg.cpu : "");
    printf("\"throughput_rps\":%.1f,\"answered_rps\":%.1f,\"ok\":%llu,\"errors\":{",
           (double)sum.ok_window / window_s,
           (double)(sum.ok_window + sum.err_window) / window_s,
           (unsigned long long)sum.ok_window);
    for (int j = 0; j < ncodes; j++) {
        printf("%s\"", j ? "," : "");
        for (const char *p = codes[j].code; *p; p++) /* codes are data: escape them */
            if (*p == '"' || *p == '\\')
                printf("\\%c", *p);
            else if ((unsigned char)*p < 0x20 || (unsigned char)*p > 0x7e)
                printf("?");
            else
                putchar(*p);
        printf("\":%llu", (unsigned long long)codes[j].n);
    }
    printf("},\"errors_total\":%llu,\"ok_total\":%llu,\"sent\":%llu,\"mismatched\":%llu,"
           "\"mismatch_detail\":{\"unknown_reqid\":%llu,\"bad_frames\":%llu,"
           "\"bad_status\":%llu,\"bad_body\":%llu},\"lost\":%llu,\"send_failures\":%llu,",
           (unsigned long long)sum.err_total, (unsigned long long)sum.ok_total,
           (unsigned long long)sum.sent, (unsigned long long)mismatched,
           (unsigned long long)sum.bad_reqid, (unsigned long long)sum.bad_frames,
           (unsigned long long)sum.bad_status, (unsigned long long)sum.bad_body,
           (unsigned long long)sum.lost, (unsigned long long)sum.send_fail);
    printf("\"latency_us\":{\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"p999\":%.1f,"
           "\"max\":%.1f,\"count\":%llu},",
           hist_percentile_us(h, 50), hist_percentile_us(h, 90), hist_percentile_us(h, 99),
           hist_percentile_us(h, 99.9), (double)h->max / 1000.0,
           (unsigned long long)h->total);
    /* client_cpu_ratio: process CPU seconds per wall second over the measured window;
     * near client_cpus means the client, not the server, set the pace. loop_cpu_ratio is
     * the part spent in the loop threads (the rest is libzmq's I/O threads). */
    printf("\"client_cpu_ratio\":%.3f,\"loop_cpu_ratio\":%.3f,\"client_cpus\":%d,"
           "\"blocking_waits\":%llu,\"measured_s\":%.3f}\n",
           (cpu1 - cpu0) / window_s, loop_cpu / window_s, ncpu,
           (unsigned long long)sum.waits, window_s);
    fflush(stdout);

    int rc = 0;
    if (setup_failed) {
        rc = 2;
    } else if (sum.lost || mismatched) {
        fprintf(stderr, "loadgen: %llu lost, %llu mismatched\n", (unsigned long long)sum.lost,
                (unsigned long long)mismatched);
        rc = 1;
    } else if (sum.ok_total + sum.err_total == 0) {
        fprintf(stderr, "loadgen: nothing was answered by %s\n", cfg.endpoint);
        rc = 1;
    }
    for (int t = 0; t < cfg.threads; t++) {
        for (int i = 0; i < ws[t].nclients; i++) {
            free(ws[t].clients[i].slots);
            free(ws[t].clients[i].free_slots);
        }
        free(ws[t].clients);
    }
    free(ws);
    free(codes);
    free(h);
    free(pattern);
    return rc;
}
