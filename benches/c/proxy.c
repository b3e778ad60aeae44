/* proxy: the baseline pools for scripts/compare.sh, built from libzmq's own parts. A ROUTER
 * front bound on --endpoint, an inproc DEALER back, zmq_proxy(front, back, NULL) between
 * them, and --workers echo threads of one of two kinds:
 *   --worker rep (default)  REP sockets replying ["OK", body...], so a client sees
 *                           [reqid, "", "OK", body]: the broker's reply shape ("c-proxy");
 *   --worker dealer         plain DEALER sockets sending back exactly the frames they read,
 *                           envelope included, so a client sees [reqid, "", body] (run it
 *                           with --raw): the least work libzmq's pool can do, no REP
 *                           envelope handling and no extra frame ("c-proxy-dealer").
 * This is what a broker is compared with: the same hop, done by the library itself.
 *
 *   proxy --endpoint tcp://127.0.0.1:5555 [--workers 2] [--worker rep|dealer] [--cpu N]
 *         [--io-threads N] [--curve-secret-key Z85]   (a CURVE server front, any client key)
 * Runs until SIGTERM or SIGINT, then exits 0; 2 on usage or a bind failure.
 */
#include "common.h"

#define BACKEND "inproc://workers"
#define MAX_FRAMES 64

static const char USAGE[] =
    "usage: proxy --endpoint E [--workers N] [--worker rep|dealer] [--cpu LIST]\n"
    "             [--io-threads N] [--curve-secret-key Z85]\n";

static void *ctx;
static int dealer_workers;

/* An echo worker. A REP socket strips the envelope, so it sees the body frames only and
 * replies "OK" + body; a DEALER socket sees [peer id, reqid, "", body] and returns it as it
 * is, which the proxy's ROUTER routes back by the peer id. */
static void *worker(void *arg)
{
    (void)arg;
    void *sock = zmq_socket(ctx, dealer_workers ? ZMQ_DEALER : ZMQ_REP);
    int zero = 0;
    if (!sock || zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero) != 0 ||
        zmq_connect(sock, BACKEND) != 0) {
        fprintf(stderr, "proxy: worker: %s\n", zmq_strerror(errno));
        if (sock)
            zmq_close(sock);
        return NULL;
    }
    zmq_msg_t f[MAX_FRAMES];
    for (int i = 0; i < MAX_FRAMES; i++)
        zmq_msg_init(&f[i]);
    for (;;) {
        int n = 0, more = 1;
        while (more) {
            zmq_msg_t *dst = n < MAX_FRAMES ? &f[n] : &f[MAX_FRAMES - 1];
            if (zmq_msg_recv(dst, sock, 0) < 0)
                goto out; /* ETERM after a stop signal */
            more = zmq_msg_more(dst);
            if (n < MAX_FRAMES)
                n++;
        }
        if (!dealer_workers && zmq_send_const(sock, "OK", 2, n ? ZMQ_SNDMORE : 0) < 0)
            goto out;
        for (int i = 0; i < n; i++)
            if (zmq_msg_send(&f[i], sock, i + 1 < n ? ZMQ_SNDMORE : 0) < 0)
                goto out;
    }
out:
    for (int i = 0; i < MAX_FRAMES; i++)
        zmq_msg_close(&f[i]);
    zmq_close(sock);
    return NULL;
}

int main(int argc, char **argv)
{
    server_flags_t flags = {NULL, NULL, 1};
    const char *curve_secret = NULL;
    double workers = 2;
    const char *a, *v;
    for (int i = 0; (a = next_flag(argc, argv, &i, NULL, &v, USAGE));) {
        if (server_flag(&flags, a, v, USAGE))
            continue;
        if (!strcmp(a, "--workers"))
            workers = number_arg(v, USAGE);
        else if (!strcmp(a, "--worker") && (!strcmp(v, "rep") || !strcmp(v, "dealer")))
            dealer_workers = !strcmp(v, "dealer");
        else if (!strcmp(a, "--curve-secret-key"))
            curve_secret = v;
        else
            usage_exit(USAGE);
    }
    if (workers < 1)
        usage_exit(USAGE);
    ctx = server_context(&flags, "proxy", USAGE);
    void *front = zmq_socket(ctx, ZMQ_ROUTER);
    void *back = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(front, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(back, ZMQ_LINGER, &zero, sizeof zero);
    int one = 1;
    if (curve_secret && (zmq_setsockopt(front, ZMQ_CURVE_SERVER, &one, sizeof one) != 0 ||
                         zmq_setsockopt(front, ZMQ_CURVE_SECRETKEY, curve_secret, 40) != 0)) {
        fprintf(stderr, "proxy: CURVE key: %s\n", zmq_strerror(errno));
        return 2;
    }
    if (zmq_bind(front, flags.endpoint) != 0 || zmq_bind(back, BACKEND) != 0) {
        fprintf(stderr, "proxy: bind %s: %s\n", flags.endpoint, zmq_strerror(errno));
        return 2;
    }
    int nworkers = (int)workers;
    pthread_t *tids = calloc((size_t)nworkers, sizeof *tids);
    if (!tids)
        return 2;
    for (int i = 0; i < nworkers; i++) {
        pthread_create(&tids[i], NULL, worker, NULL);
        char name[24]; /* named like the broker's, so per-thread figures line up */
        snprintf(name, sizeof name, "worker-%d", i);
        pthread_setname_np(tids[i], name);
    }
    pthread_t stop_tid;
    start_stop_thread(&stop_tid, ctx);
    pthread_setname_np(stop_tid, "signals");

    zmq_proxy(front, back, NULL); /* returns -1 with ETERM once the context shuts down */
    int rc = 0;
    if (errno != ETERM) {
        fprintf(stderr, "proxy: %s\n", zmq_strerror(errno));
        rc = 1;
        zmq_ctx_shutdown(ctx);
        end_stop_thread(stop_tid);
    }
    pthread_join(stop_tid, NULL);
    for (int i = 0; i < nworkers; i++)
        pthread_join(tids[i], NULL);
    free(tids);
    zmq_close(front);
    zmq_close(back);
    zmq_ctx_term(ctx);
    return rc;
}
