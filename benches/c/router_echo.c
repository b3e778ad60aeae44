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
    server_flags_t flags = {NULL, NULL, 1};
    const char *a, *v;
    for (int i = 0; (a = next_flag(argc, argv, &i, NULL, &v, USAGE));)
        if (!server_flag(&flags, a, v, USAGE))
            usage_exit(USAGE);
    void *ctx = server_context(&flags, "router_echo", USAGE);
    void *sock = zmq_socket(ctx, ZMQ_ROUTER);
    int zero = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_bind(sock, flags.endpoint) != 0) {
        fprintf(stderr, "router_echo: bind %s: %s\n", flags.endpoint, zmq_strerror(errno));
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
