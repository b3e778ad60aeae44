/* router_echo: the no-hop limit for scripts/compare.sh. One ROUTER socket on one thread
 * receives [id, reqid, "", body] and sends [id, reqid, "", "OK", body] back, moving the
 * received frames into the send (zmq_msg_t moves, no copies) and sending "OK" as a
 * constant. No broker can beat this on the same core; a load client that cannot drive it
 * well past a real pool is itself the bottleneck.
 *
 *   router_echo --endpoint tcp://127.0.0.1:5555 [--cpu N] [--io-threads N]
 * Runs until SIGTERM or SIGINT, then exits 0.
 */
#include "common.h"

#define MAX_FRAMES 64

static const char USAGE[] = "usage: router_echo --endpoint E [--cpu LIST] [--io-threads N]\n";

int main(int argc, char **argv)
{
    const char *endpoint = NULL, *cpu = NULL;
    double io_threads = 1;
    for (int i = 1; i < argc; i += 2) {
        if (i + 1 >= argc)
            usage_exit(USAGE);
        if (!strcmp(argv[i], "--endpoint"))
            endpoint = argv[i + 1];
        else if (!strcmp(argv[i], "--cpu"))
            cpu = argv[i + 1];
        else if (!strcmp(argv[i], "--io-threads"))
            io_threads = parse_number(argv[i + 1]);
        else
            usage_exit(USAGE);
    }
    if (!endpoint || io_threads < 1)
        usage_exit(USAGE);
    /* Pin and block the stop signals before any thread exists, so every thread (libzmq's
     * I/O threads too) inherits both. */
    if (cpu && pin_to(cpu) != 0) {
        fprintf(stderr, "router_echo: cannot pin to CPU %s\n", cpu);
        return 2;
    }
    block_stop_signals();

    void *ctx = zmq_ctx_new();
    zmq_ctx_set(ctx, ZMQ_IO_THREADS, (int)io_threads);
    void *sock = zmq_socket(ctx, ZMQ_ROUTER);
    int zero = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_bind(sock, endpoint) != 0) {
        fprintf(stderr, "router_echo: bind %s: %s\n", endpoint, zmq_strerror(errno));
        return 2;
    }
    pthread_t sig_tid;
    start_stop_thread(&sig_tid, ctx);
    pthread_setname_np(sig_tid, "signals");

    zmq_msg_t f[MAX_FRAMES];
    for (int i = 0; i < MAX_FRAMES; i++)
        zmq_msg_init(&f[i]);
    int rc = 0;
    for (;;) {
        int n = 0, more = 1, too_many = 0;
        while (more) {
            zmq_msg_t *dst = n < MAX_FRAMES ? &f[n] : &f[MAX_FRAMES - 1];
            if (zmq_msg_recv(dst, sock, 0) < 0)
                goto out; /* ETERM after a stop signal */
            more = zmq_msg_more(dst);
            if (n < MAX_FRAMES)
                n++;
            else
                too_many = 1;
        }
        /* The envelope ends at the first empty frame after the peer id. */
        int d = 1;
        while (d < n && zmq_msg_size(&f[d]) != 0)
            d++;
        if (too_many || d >= n)
            continue; /* not our protocol: drop, as a ROUTER drops what it cannot route */
        for (int i = 0; i <= d; i++)
            if (zmq_msg_send(&f[i], sock, ZMQ_SNDMORE) < 0)
                goto out;
        if (zmq_send_const(sock, "OK", 2, d + 1 < n ? ZMQ_SNDMORE : 0) < 0)
            goto out;
        for (int i = d + 1; i < n; i++)
            if (zmq_msg_send(&f[i], sock, i + 1 < n ? ZMQ_SNDMORE : 0) < 0)
                goto out;
    }
out:
    if (errno != ETERM) {
        fprintf(stderr, "router_echo: %s\n", zmq_strerror(errno));
        rc = 1;
        end_stop_thread(sig_tid);
    }
    pthread_join(sig_tid, NULL);
    for (int i = 0; i < MAX_FRAMES; i++)
        zmq_msg_close(&f[i]);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return rc;
}
