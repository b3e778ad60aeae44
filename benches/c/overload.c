/* overload: an open-loop load client with client deadlines, for scripts/perf.sh overload
 * (issue 20). C against the system libzmq, sharing no code with the broker.
 *
 * --clients DEALER sockets send requests at a fixed total --rate, whatever the server
 * answers (open loop: a slow server does not slow the offered load, as real clients with
 * deadlines do not wait for each other). Arrivals are a Poisson process with a fixed seed
 * (exponential gaps, reproducible run to run; --arrivals uniform gives equal gaps), each
 * arrival going to the next client in turn. A request is
 *   [reqid(8), "", "\0broker.timeout-ms=<D>", body]   (without --no-header: [reqid, "", body])
 * where D is --deadline-ms and body is --body (for the broker's sleep handler, its ASCII
 * milliseconds). Replies are [reqid, "", "OK", body...] or [reqid, "", "ERR", code, message].
 *
 * For every request sent it counts: OK within D of sending (goodput), OK after D (late: work
 * done for a client that gave up), ERR by code (and their latency), no reply at all within
 * D + --grace-ms, and never answered by the end. After --duration of load it stops sending,
 * keeps collecting late replies for up to --drain seconds, and measures recovery: a fresh
 * client (a new socket) sends one request every --recovery-every-ms with the same deadline
 * and reports the time from the end of the load to its first OK within its deadline (or
 * none within --recovery-timeout). Prints one JSON object.
 *
 *   overload --endpoint tcp://127.0.0.1:5555 --rate 1000 --clients 20 --duration 20 \
 *            --deadline-ms 1000 --body 10 [--no-header] [--grace-ms 100] [--drain 30] \
 *            [--recovery-every-ms 10] [--recovery-timeout 30] [--arrivals poisson|uniform] \
 *            [--seed N] [--cpu LIST]
 * Exits 0 with a report, 1 if nothing was answered at all or a reply did not match a request
 * sent, 2 on usage. Every wait is bounded: the run ends by itself after at most
 * --duration + max(--drain, --recovery-timeout) + 1 s.
 */
#include "common.h"

#include <math.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/timerfd.h>
#include <unistd.h>

static const char USAGE[] =
    "usage: overload --endpoint E --rate R [--clients N] [--duration S] [--deadline-ms D]\n"
    "                [--body TEXT] [--no-header] [--grace-ms G] [--drain S]\n"
    "                [--recovery-every-ms M] [--recovery-timeout S]\n"
    "                [--arrivals poisson|uniform] [--seed N] [--cpu LIST]\n";

#define HEADER_PREFIX "\0broker.timeout-ms="
#define HEADER_PREFIX_LEN (sizeof HEADER_PREFIX - 1)
/* Recovery requests are told apart from the load's by the top bit of their id. */
#define RECOVERY_BIT (1ull << 63)
#define MAX_FRAMES 8

static struct {
    const char *endpoint, *body, *cpu;
    double rate, duration, drain, recovery_timeout;
    int clients, header, uniform;
    uint64_t deadline_ms, grace_ms, recovery_every_ms, seed;
} cfg = {"tcp://127.0.0.1:5555", "10", NULL, 0, 20, 30, 30, 20, 1, 0, 1000, 100, 10, 1};

static void parse_args(int argc, char **argv)
{
    static const char *const switches[] = {"--no-header", NULL};
    const char *a, *v;
    for (int i = 0; (a = next_flag(argc, argv, &i, switches, &v, USAGE));) {
        if (!strcmp(a, "--no-header"))
            cfg.header = 0;
        else if (!strcmp(a, "--endpoint"))
            cfg.endpoint = v;
        else if (!strcmp(a, "--rate"))
            cfg.rate = number_arg(v, USAGE);
        else if (!strcmp(a, "--clients"))
            cfg.clients = (int)number_arg(v, USAGE);
        else if (!strcmp(a, "--duration"))
            cfg.duration = number_arg(v, USAGE);
        else if (!strcmp(a, "--deadline-ms"))
            cfg.deadline_ms = (uint64_t)number_arg(v, USAGE);
        else if (!strcmp(a, "--body"))
            cfg.body = v;
        else if (!strcmp(a, "--grace-ms"))
            cfg.grace_ms = (uint64_t)number_arg(v, USAGE);
        else if (!strcmp(a, "--drain"))
            cfg.drain = number_arg(v, USAGE);
        else if (!strcmp(a, "--recovery-every-ms"))
            cfg.recovery_every_ms = (uint64_t)number_arg(v, USAGE);
        else if (!strcmp(a, "--recovery-timeout"))
            cfg.recovery_timeout = number_arg(v, USAGE);
        else if (!strcmp(a, "--arrivals") && (!strcmp(v, "poisson") || !strcmp(v, "uniform")))
            cfg.uniform = !strcmp(v, "uniform");
        else if (!strcmp(a, "--seed"))
            cfg.seed = (uint64_t)number_arg(v, USAGE);
        else if (!strcmp(a, "--cpu"))
            cfg.cpu = v;
        else
            usage_exit(USAGE);
    }
    if (cfg.rate <= 0 || cfg.clients < 1 || cfg.duration <= 0 || cfg.deadline_ms < 1 ||
        cfg.recovery_every_ms < 1 || cfg.rate * cfg.duration > 1e8)
        usage_exit(USAGE);
}

/* ---- arrivals ------------------------------------------------------------------------ */

static uint64_t rng_state;

/* splitmix64: a fixed seed gives the same arrival times every run. */
static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The gap to the next arrival, in ns. */
static uint64_t next_gap_ns(void)
{
    double mean = 1e9 / cfg.rate;
    if (cfg.uniform)
        return (uint64_t)mean;
    double u = ((double)(rng_next() >> 11) + 0.5) / 9007199254740992.0; /* (0, 1) */
    return (uint64_t)(-log(u) * mean);
}

/* ---- requests and their outcomes ----------------------------------------------------- */

typedef struct {
    uint64_t sent_at;
    uint8_t answered;
} request_t;

static request_t *reqs;
static uint64_t nreqs, cap_reqs;

static struct {
    uint64_t ok_within, ok_late, err, err_late, mismatched, send_failed;
    uint64_t no_reply_in_time; /* filled at the end: no reply within D + grace */
    hist_t ok_hist, late_hist, err_hist;
    code_count_t codes[MAX_CODES + 1];
    int ncodes;
} st;

static struct {
    void *sock;
    uint64_t *sent_at; /* by request number; room for every send until the timeout */
    uint64_t max_sends, sent, ok, ok_late, err, next_at, recovered_at;
    code_count_t codes[MAX_CODES + 1];
    int ncodes;
} rec;

static uint64_t t_load_end, deadline_ns, grace_ns;
static char header[64];
static size_t header_len;

/* Sends one request with id `rid`; 0 if libzmq refused it. */
static int send_request(void *sock, uint64_t rid)
{
    if (zmq_send(sock, &rid, 8, ZMQ_SNDMORE | ZMQ_DONTWAIT) != 8)
        return 0;
    size_t body_len = strlen(cfg.body);
    if (zmq_send(sock, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) != 0)
        return 0;
    if (cfg.header && zmq_send(sock, header, header_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0)
        return 0;
    return zmq_send(sock, cfg.body, body_len, ZMQ_DONTWAIT) >= 0;
}

static void load_send(void *sock, uint64_t now)
{
    if (nreqs == cap_reqs) {
        cap_reqs = cap_reqs ? cap_reqs * 2 : 4096;
        request_t *grown = realloc(reqs, cap_reqs * sizeof *reqs);
        if (!grown) {
            perror("overload: realloc");
            exit(2);
        }
        reqs = grown;
    }
    uint64_t rid = nreqs;
    reqs[nreqs++] = (request_t){now, 0};
    if (!send_request(sock, rid))
        st.send_failed++;
}

/* One reply: which request, and what it says. */
static void on_reply(zmq_msg_t *f, int n, uint64_t now)
{
    uint64_t rid;
    if (n < 3 || zmq_msg_size(&f[0]) != 8 || zmq_msg_size(&f[1]) != 0) {
        st.mismatched++;
        return;
    }
    memcpy(&rid, zmq_msg_data(&f[0]), 8);
    size_t slen = zmq_msg_size(&f[2]);
    const char *status = zmq_msg_data(&f[2]);
    int ok = slen == 2 && !memcmp(status, "OK", 2);
    int err = slen == 3 && !memcmp(status, "ERR", 3) && n >= 4;
    if (rid & RECOVERY_BIT) {
        uint64_t i = rid & ~RECOVERY_BIT;
        if (i >= rec.sent) {
            st.mismatched++;
            return;
        }
        if (ok && now - rec.sent_at[i] <= deadline_ns) {
            rec.ok++;
            if (!rec.recovered_at)
                rec.recovered_at = now;
        } else if (ok) {
            rec.ok_late++;
        } else if (err) {
            rec.err++;
            add_code(rec.codes, &rec.ncodes, zmq_msg_data(&f[3]), zmq_msg_size(&f[3]), 1);
        }
        return;
    }
    if (rid >= nreqs || reqs[rid].answered || (!ok && !err)) {
        st.mismatched++;
        return;
    }
    request_t *r = &reqs[rid];
    r->answered = 1;
    uint64_t lat = now - r->sent_at;
    if (lat > deadline_ns + grace_ns)
        st.no_reply_in_time++;
    if (ok && lat <= deadline_ns) {
        st.ok_within++;
        hist_record(&st.ok_hist, lat);
    } else if (ok) {
        st.ok_late++;
        hist_record(&st.ok_hist, lat);
        hist_record(&st.late_hist, lat);
    } else {
        st.err++;
        st.err_late += lat > deadline_ns;
        hist_record(&st.err_hist, lat);
        add_code(st.codes, &st.ncodes, zmq_msg_data(&f[3]), zmq_msg_size(&f[3]), 1);
    }
}

/* Reads every reply waiting on `sock` (its ZMQ_FD is edge-like: read it to EAGAIN). */
static int drain(void *sock, zmq_msg_t *f)
{
    int got = 0;
    for (;;) {
        if (zmq_msg_recv(&f[0], sock, ZMQ_DONTWAIT) < 0)
            return got;
        int n = 1;
        while (zmq_msg_more(&f[n - 1]) && n < MAX_FRAMES)
            if (zmq_msg_recv(&f[n++], sock, ZMQ_DONTWAIT) < 0)
                break;
        while (zmq_msg_more(&f[n - 1])) /* more frames than any reply has: skip them */
            if (zmq_msg_recv(&f[n - 1], sock, ZMQ_DONTWAIT) < 0)
                break;
        on_reply(f, n, now_ns());
        got++;
    }
}

static void *new_socket(void *ctx, int epfd, uint32_t tag)
{
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0, ivl = 10, fd;
    size_t len = sizeof fd;
    /* Unlimited queues: an open-loop client never blocks (or drops) a send. LINGER 0: exit
     * never waits on a server that stopped reading. */
    if (!sock || zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero) != 0 ||
        zmq_setsockopt(sock, ZMQ_SNDHWM, &zero, sizeof zero) != 0 ||
        zmq_setsockopt(sock, ZMQ_RCVHWM, &zero, sizeof zero) != 0 ||
        zmq_setsockopt(sock, ZMQ_RECONNECT_IVL, &ivl, sizeof ivl) != 0 ||
        zmq_connect(sock, cfg.endpoint) != 0 || zmq_getsockopt(sock, ZMQ_FD, &fd, &len) != 0) {
        fprintf(stderr, "overload: socket for %s: %s\n", cfg.endpoint, zmq_strerror(errno));
        exit(2);
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = tag};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
        perror("overload: epoll_ctl");
        exit(2);
    }
    return sock;
}

static void arm(int tfd, uint64_t at)
{
    struct itimerspec its = {{0, 0}, {(time_t)(at / 1000000000u), (long)(at % 1000000000u)}};
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    if (cfg.cpu && pin_to(cfg.cpu) != 0) {
        fprintf(stderr, "overload: cannot pin to CPU %s\n", cfg.cpu);
        return 2;
    }
    rng_state = cfg.seed;
    deadline_ns = cfg.deadline_ms * 1000000u;
    grace_ns = cfg.grace_ms * 1000000u;
    memcpy(header, HEADER_PREFIX, HEADER_PREFIX_LEN);
    header_len = HEADER_PREFIX_LEN +
                 (size_t)snprintf(header + HEADER_PREFIX_LEN, sizeof header - HEADER_PREFIX_LEN,
                                  "%llu", (unsigned long long)cfg.deadline_ms);

    void *ctx = zmq_ctx_new();
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    if (!ctx || epfd < 0 || tfd < 0) {
        perror("overload: setup");
        return 2;
    }
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &tev);
    void **socks = calloc((size_t)cfg.clients, sizeof *socks);
    rec.max_sends = (uint64_t)(cfg.recovery_timeout * 1000.0 / (double)cfg.recovery_every_ms) + 2;
    rec.sent_at = calloc(rec.max_sends, sizeof *rec.sent_at);
    if (!socks || !rec.sent_at)
        return 2;
    for (int i = 0; i < cfg.clients; i++)
        socks[i] = new_socket(ctx, epfd, (uint32_t)i);
    zmq_msg_t f[MAX_FRAMES];
    for (int i = 0; i < MAX_FRAMES; i++)
        zmq_msg_init(&f[i]);

    /* Let the connections come up before the clock starts: a request queued on a socket
     * still connecting would otherwise start its deadline early. */
    sleep_until(now_ns() + 100000000u);
    double cpu0 = cpu_seconds();
    uint64_t t0 = now_ns();
    t_load_end = t0 + (uint64_t)(cfg.duration * 1e9);
    uint64_t t_drain_end = t_load_end + (uint64_t)(cfg.drain * 1e9);
    uint64_t t_recovery_end = t_load_end + (uint64_t)(cfg.recovery_timeout * 1e9);
    uint64_t next_send = t0, last_sweep = t0;
    double cpu_load_end = -1;
    int next_client = 0;
    struct epoll_event events[64];

    for (;;) {
        uint64_t now = now_ns();
        int loading = now < t_load_end;
        if (loading) {
            while (next_send <= now && next_send < t_load_end) {
                int c = next_client;
                next_client = (next_client + 1) % cfg.clients;
                load_send(socks[c], next_send);
                drain(socks[c], f); /* a send may take the notification a reply would give */
                next_send += next_gap_ns();
            }
        } else {
            if (cpu_load_end < 0)
                cpu_load_end = cpu_seconds();
            if (!rec.sock) {
                rec.sock = new_socket(ctx, epfd, UINT32_MAX - 1);
                rec.next_at = now;
            }
            if (!rec.recovered_at && now < t_recovery_end && now >= rec.next_at &&
                rec.sent < rec.max_sends) {
                rec.sent_at[rec.sent] = now;
                if (send_request(rec.sock, RECOVERY_BIT | rec.sent))
                    rec.sent++;
                rec.next_at += cfg.recovery_every_ms * 1000000u;
                drain(rec.sock, f);
            }
            uint64_t answered = st.ok_within + st.ok_late + st.err;
            int drained = answered + st.mismatched >= nreqs || now >= t_drain_end;
            int recovery_done = rec.recovered_at || now >= t_recovery_end;
            if (drained && recovery_done)
                break;
        }
        /* A sweep of every socket now and then, immune to a missed edge. */
        if (now - last_sweep >= 10000000u) {
            last_sweep = now;
            for (int i = 0; i < cfg.clients; i++)
                drain(socks[i], f);
            if (rec.sock)
                drain(rec.sock, f);
        }
        uint64_t wake = now + 10000000u;
        if (loading && next_send < wake)
            wake = next_send;
        if (!loading && !rec.recovered_at && rec.next_at < wake)
            wake = rec.next_at;
        arm(tfd, wake > now ? wake : now + 1000);
        int n = epoll_wait(epfd, events, 64, 20);
        for (int k = 0; k < n; k++) {
            uint32_t tag = events[k].data.u32;
            if (tag == UINT32_MAX) {
                uint64_t expirations;
                while (read(tfd, &expirations, sizeof expirations) > 0) {
                }
            } else if (tag == UINT32_MAX - 1) {
                drain(rec.sock, f);
            } else {
                drain(socks[tag], f);
            }
        }
    }
    uint64_t t_end = now_ns();
    uint64_t unanswered = 0;
    for (uint64_t i = 0; i < nreqs; i++)
        if (!reqs[i].answered) {
            unanswered++;
            st.no_reply_in_time++;
        }

    printf("{\"tool\":\"overload.c\",\"endpoint\":\"%s\",\"rate\":%g,\"clients\":%d,"
           "\"duration_s\":%g,\"deadline_ms\":%llu,\"grace_ms\":%llu,\"header\":%s,"
           "\"arrivals\":\"%s\",\"body\":",
           cfg.endpoint, cfg.rate, cfg.clients, cfg.duration,
           (unsigned long long)cfg.deadline_ms, (unsigned long long)cfg.grace_ms,
           cfg.header ? "true" : "false", cfg.uniform ? "uniform" : "poisson");
    print_json_string(cfg.body);
    printf(",\"offered\":%llu,\"send_failed\":%llu,\"ok_within_deadline\":%llu,"
           "\"ok_late\":%llu,\"err\":%llu,\"err_after_deadline\":%llu,\"errors\":",
           (unsigned long long)nreqs, (unsigned long long)st.send_failed,
           (unsigned long long)st.ok_within, (unsigned long long)st.ok_late,
           (unsigned long long)st.err, (unsigned long long)st.err_late);
    print_codes_json(st.codes, st.ncodes);
    printf(",\"no_reply_within_deadline_plus_grace\":%llu,\"unanswered_at_end\":%llu,"
           "\"mismatched\":%llu,\"ok_latency_us\":",
           (unsigned long long)st.no_reply_in_time, (unsigned long long)unanswered,
           (unsigned long long)st.mismatched);
    hist_print_json(&st.ok_hist);
    printf(",\"late_latency_us\":");
    hist_print_json(&st.late_hist);
    printf(",\"err_latency_us\":");
    hist_print_json(&st.err_hist);
    printf(",\"recovery\":{\"sent\":%llu,\"ok\":%llu,\"ok_late\":%llu,\"err\":%llu,"
           "\"errors\":",
           (unsigned long long)rec.sent, (unsigned long long)rec.ok,
           (unsigned long long)rec.ok_late, (unsigned long long)rec.err);
    print_codes_json(rec.codes, rec.ncodes);
    if (rec.recovered_at)
        printf(",\"first_ok_ms\":%.1f}", (double)(rec.recovered_at - t_load_end) / 1e6);
    else
        printf(",\"first_ok_ms\":null}");
    printf(",\"load_cpu_ratio\":%.3f,\"collect_s\":%.3f}\n",
           cpu_load_end >= 0 ? (cpu_load_end - cpu0) / cfg.duration : 0.0,
           (double)(t_end - t_load_end) / 1e9);
    fflush(stdout);

    for (int i = 0; i < cfg.clients; i++)
        zmq_close(socks[i]);
    if (rec.sock)
        zmq_close(rec.sock);
    for (int i = 0; i < MAX_FRAMES; i++)
        zmq_msg_close(&f[i]);
    zmq_ctx_term(ctx);
    free(socks);
    free(rec.sent_at);
    free(reqs);
    if (st.mismatched) {
        fprintf(stderr, "overload: %llu replies matched no request sent\n",
                (unsigned long long)st.mismatched);
        return 1;
    }
    if (st.ok_within + st.ok_late + st.err == 0) {
        fprintf(stderr, "overload: nothing was answered by %s\n", cfg.endpoint);
        return 1;
    }
    return 0;
}
