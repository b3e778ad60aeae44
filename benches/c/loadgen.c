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
 *           [--requests N]
 *           [--curve-server-key Z85 --curve-public-key Z85 --curve-secret-key Z85]
 *
 * Clients are spread over --threads loop threads, each with its own libzmq context (one
 * I/O thread) and its own epoll loop. Throughput counts OK replies received in the measured
 * window (after --warmup); latency covers requests sent in it; the run then stops sending
 * and waits up to --drain seconds for what is outstanding, which is counted lost after
 * that. client_cpu_ratio (process CPU seconds per wall second over the measured window)
 * near client_cpus means the client, not the server, set the pace.
 *
 * --requests N sends exactly N requests in all and ends once they are answered (--duration
 * then only bounds the run): a fixed count, so that counts taken on the server (callgrind's
 * instructions, perf's syscalls) divide into per-request figures. --warmup-requests M first
 * sends M on the same connections and waits for all of them, prints "loadgen: warmed up" on
 * stderr and pauses --pause seconds with nothing in flight (when a profiler zeroes its
 * counters); only the N are reported.
 */
#include "common.h"

#include <malloc.h>
#include <stdatomic.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <unistd.h>

/* ---- clocks ---------------------------------------------------------------------- */

static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double rusage_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* ---- configuration ------------------------------------------------------------------ */

typedef struct {
    const char *endpoint;
    int clients, window, threads, raw;
    size_t size;
    double duration, warmup, drain;
    uint64_t requests; /* --requests: send this many in all, then stop (0: for --duration) */
    uint64_t warmup_requests; /* --warmup-requests: a separate, uncounted phase first */
    double pause;             /* --pause: seconds between that phase and the measured one */
    const char *cpu;
    /* CURVE (Z85 text): the server's public key and this client's pair; all or none. */
    const char *curve_server, *curve_public, *curve_secret;
} config_t;

static config_t cfg = {"tcp://127.0.0.1:5555", 16, 16, 1, 0, 64, 5.0, 1.0, 2.0, 0, 0, 0,
                       NULL, NULL, NULL, NULL};

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
    uint64_t quota; /* with --requests: how many this thread sends in all (0: no limit) */
    int setup_failed;
} worker_t;

/* Loop threads that have finished: with --requests the run ends when all have. */
static atomic_int threads_done;

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
                add_code(w->codes, &w->ncodes, zmq_msg_data(&f[3]), zmq_msg_size(&f[3]), 1);
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
    while (c->nfree > 0 && (!w->quota || w->sent < w->quota)) {
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
        if (!draining && (now >= t_end || (w->quota && w->sent >= w->quota))) {
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
    atomic_fetch_add(&threads_done, 1);
    return NULL;
}

/* ---- setup and report --------------------------------------------------------------- */

static const char USAGE[] =
    "usage: loadgen [--endpoint E] [--clients N] [--window W] [--size BYTES]\n"
    "               [--duration S] [--warmup S] [--drain S] [--threads T]\n"
    "               [--requests N [--warmup-requests M] [--pause S]] [--cpu LIST] [--raw]\n"
    "               [--curve-server-key Z85 --curve-public-key Z85 --curve-secret-key Z85]\n";

static void parse_args(int argc, char **argv)
{
    static const char *const switches[] = {"--raw", NULL};
    const char *a, *v;
    for (int i = 0; (a = next_flag(argc, argv, &i, switches, &v, USAGE));) {
        if (!strcmp(a, "--raw"))
            cfg.raw = 1;
        else if (!strcmp(a, "--endpoint"))
            cfg.endpoint = v;
        else if (!strcmp(a, "--clients"))
            cfg.clients = (int)number_arg(v, USAGE);
        else if (!strcmp(a, "--window"))
            cfg.window = (int)number_arg(v, USAGE);
        else if (!strcmp(a, "--size"))
            cfg.size = (size_t)number_arg(v, USAGE);
        else if (!strcmp(a, "--duration"))
            cfg.duration = number_arg(v, USAGE);
        else if (!strcmp(a, "--warmup"))
            cfg.warmup = number_arg(v, USAGE);
        else if (!strcmp(a, "--drain"))
            cfg.drain = number_arg(v, USAGE);
        else if (!strcmp(a, "--requests"))
            cfg.requests = (uint64_t)number_arg(v, USAGE);
        else if (!strcmp(a, "--warmup-requests"))
            cfg.warmup_requests = (uint64_t)number_arg(v, USAGE);
        else if (!strcmp(a, "--pause"))
            cfg.pause = number_arg(v, USAGE);
        else if (!strcmp(a, "--threads"))
            cfg.threads = (int)number_arg(v, USAGE);
        else if (!strcmp(a, "--cpu"))
            cfg.cpu = v;
        else if (!strcmp(a, "--curve-server-key"))
            cfg.curve_server = v;
        else if (!strcmp(a, "--curve-public-key"))
            cfg.curve_public = v;
        else if (!strcmp(a, "--curve-secret-key"))
            cfg.curve_secret = v;
        else
            usage_exit(USAGE);
    }
    if (cfg.clients < 1 || cfg.clients > 65535 || cfg.window < 1 || cfg.window > 65535 ||
        cfg.threads < 1 || cfg.duration <= 0)
        usage_exit(USAGE);
    if ((cfg.warmup_requests || cfg.pause) && !cfg.requests)
        usage_exit(USAGE);
    if (cfg.threads > cfg.clients)
        cfg.threads = cfg.clients;
    /* Every thread sends at least one request of a counted phase (a quota of 0 means none). */
    if (cfg.requests && (uint64_t)cfg.threads > cfg.requests)
        cfg.threads = (int)cfg.requests;
    if (cfg.warmup_requests && (uint64_t)cfg.threads > cfg.warmup_requests)
        cfg.threads = (int)cfg.warmup_requests;
    int curve = !!cfg.curve_server + !!cfg.curve_public + !!cfg.curve_secret;
    if (curve != 0 && curve != 3)
        usage_exit(USAGE);
}

/* Zeroes what a phase counts (the sockets and their slots carry over). */
static void reset_counts(worker_t *w)
{
    memset(&w->hist, 0, sizeof w->hist);
    w->sent = w->ok_total = w->ok_window = w->err_total = w->err_window = 0;
    w->bad_reqid = w->bad_frames = w->bad_status = w->bad_body = w->lost = w->send_fail = 0;
    memset(w->codes, 0, sizeof w->codes);
    w->ncodes = 0;
    w->cpu_at_warm = w->cpu_at_end = w->waits = 0;
}

/* One phase of load: `requests` in all (0: for --duration), `warmup` s not counted. Sets the
 * process CPU and the clock at the start and end of the measured window. */
static int run_phase(worker_t *ws, uint64_t requests, double warmup, double *cpu0,
                     double *cpu1, uint64_t *w0, uint64_t *w1)
{
    atomic_store(&threads_done, 0);
    t_start = now_ns();
    t_warm = t_start + (uint64_t)(warmup * 1e9);
    t_end = t_warm + (uint64_t)(cfg.duration * 1e9);
    t_drain_end = t_end + (uint64_t)(cfg.drain * 1e9);
    for (int t = 0; t < cfg.threads; t++) {
        /* The count split over the threads, the remainder to the first ones (parse_args
         * keeps every share above 0, which would mean no limit). */
        ws[t].quota = requests ? requests / (uint64_t)cfg.threads +
                                     ((uint64_t)t < requests % (uint64_t)cfg.threads)
                               : 0;
        if (pthread_create(&ws[t].tid, NULL, worker_main, &ws[t]) != 0) {
            fprintf(stderr, "loadgen: pthread_create failed\n");
            return 2;
        }
    }
    /* The process CPU over the measured window, including libzmq's I/O threads. */
    sleep_until(t_warm);
    *cpu0 = rusage_s();
    *w0 = now_ns();
    /* Until the end of the window, or (with a request count) until every thread is done. */
    for (uint64_t t = now_ns(); t < t_end && atomic_load(&threads_done) < cfg.threads;
         t = now_ns())
        sleep_until(t + 10000000u < t_end ? t + 10000000u : t_end);
    *cpu1 = rusage_s();
    *w1 = now_ns();
    for (int t = 0; t < cfg.threads; t++)
        pthread_join(ws[t].tid, NULL);
    return 0;
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

    uint64_t warm_lost = 0, warm_mismatched = 0;
    if (cfg.warmup_requests) {
        /* A warm-up of its own, fully answered, then a pause with nothing in flight: a
         * profiler can zero its counters in the pause, and the measured phase then holds
         * exactly --requests requests on connections already made. */
        double c0, c1;
        uint64_t t0, t1;
        if (run_phase(ws, cfg.warmup_requests, 0.0, &c0, &c1, &t0, &t1) != 0)
            return 2;
        for (int t = 0; t < cfg.threads; t++) {
            worker_t *w = &ws[t];
            warm_lost += w->lost;
            warm_mismatched += w->bad_reqid + w->bad_frames + w->bad_status + w->bad_body;
            reset_counts(w);
        }
        fprintf(stderr, "loadgen: warmed up with %llu requests; pausing %g s\n",
                (unsigned long long)cfg.warmup_requests, cfg.pause);
        sleep_until(now_ns() + (uint64_t)(cfg.pause * 1e9));
    }
    double cpu0, cpu1;
    uint64_t w0, w1;
    if (run_phase(ws, cfg.requests, cfg.warmup, &cpu0, &cpu1, &w0, &w1) != 0)
        return 2;
    for (int t = 0; t < cfg.threads; t++) {
        for (int i = 0; i < ws[t].nclients; i++)
            zmq_close(ws[t].clients[i].sock);
        zmq_ctx_term(ws[t].ctx);
    }

    hist_t *h = calloc(1, sizeof *h);
    worker_t sum = {0};
    code_count_t *codes = calloc(MAX_CODES + 1, sizeof *codes);
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
        sum.lost += w->lost + (t == 0 ? warm_lost : 0);
        sum.send_fail += w->send_fail;
        sum.waits += w->waits;
        setup_failed |= w->setup_failed;
        if (w->cpu_at_end > w->cpu_at_warm && w->cpu_at_warm)
            loop_cpu += (double)(w->cpu_at_end - w->cpu_at_warm) / 1e9;
        merge_codes(codes, &ncodes, w->codes);
    }
    double window_s = (double)(w1 - w0) / 1e9;
    uint64_t mismatched =
        sum.bad_reqid + sum.bad_frames + sum.bad_status + sum.bad_body + warm_mismatched;
    int ncpu = 0;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        ncpu = CPU_COUNT(&set);

    printf("{\"tool\":\"loadgen.c\",\"endpoint\":\"%s\",\"clients\":%d,\"window\":%d,"
           "\"size\":%zu,\"duration_s\":%g,\"warmup_s\":%g,\"drain_s\":%g,\"threads\":%d,"
           "\"raw\":%s,\"cpu\":\"%s\",",
           cfg.endpoint, cfg.clients, cfg.window, cfg.size, cfg.duration, cfg.warmup,
           cfg.drain, cfg.threads, cfg.raw ? "true" : "false", cfg.cpu ? cfg.cpu : "");
    printf("\"requests\":%llu,\"throughput_rps\":%.1f,\"answered_rps\":%.1f,\"ok\":%llu,"
           "\"errors\":",
           (unsigned long long)cfg.requests, (double)sum.ok_window / window_s,
           (double)(sum.ok_window + sum.err_window) / window_s,
           (unsigned long long)sum.ok_window);
    print_codes_json(codes, ncodes);
    printf(",\"errors_total\":%llu,\"ok_total\":%llu,\"sent\":%llu,\"mismatched\":%llu,"
           "\"mismatch_detail\":{\"unknown_reqid\":%llu,\"bad_frames\":%llu,"
           "\"bad_status\":%llu,\"bad_body\":%llu},\"lost\":%llu,\"send_failures\":%llu,",
           (unsigned long long)sum.err_total, (unsigned long long)sum.ok_total,
           (unsigned long long)sum.sent, (unsigned long long)mismatched,
           (unsigned long long)sum.bad_reqid, (unsigned long long)sum.bad_frames,
           (unsigned long long)sum.bad_status, (unsigned long long)sum.bad_body,
           (unsigned long long)sum.lost, (unsigned long long)sum.send_fail);
    printf("\"latency_us\":");
    hist_print_json(h);
    putchar(',');
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
