/* proxy: the baseline pool for scripts/compare.sh, built from libzmq's own parts. A ROUTER
 * front bound on --endpoint, an inproc DEALER back, zmq_proxy(front, back, NULL) between
 * them, and --workers echo threads with REP sockets replying ["OK", body...], so a client
 * sees [reqid, "", "OK", body]. This is what a broker is compared with: the same hop, done
 * by the library itself.
 *
 *   proxy --endpoint tcp://127.0.0.1:5555 [--workers 2] [--cpu N] [--io-threads N]
 *         [--curve-secret-key Z85]   (the front as a CURVE server, any client key accepted)
 * Runs until SIGTERM or SIGINT, then exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define BACKEND "inproc://workers"
#define MAX_FRAMES 64

static void usage(void)
{
    fprintf(stderr,
            "usage: proxy --endpoint E [--workers N] [--cpu LIST] [--io-threads N]\n"
            "             [--curve-secret-key Z85]\n");
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

static void *ctx;

/* An echo worker: REP strips the envelope, so it sees the body frames only. */
static void *worker(void *arg)
{
    (void)arg;
    void *sock = zmq_socket(ctx, ZMQ_REP);
    int zero = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero);
    if (!sock || zmq_connect(sock, BACKEND) != 0) {
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
        if (zmq_send_const(sock, "OK", 2, n ? ZMQ_SNDMORE : 0) < 0)
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

/* The signal thread: SIGTERM/SIGINT become a context shutdown, which ends zmq_proxy and
 * every worker's receive with ETERM. */
static sigset_t stop_signals;
static void *signal_thread(void *arg)
{
    (void)arg;
    int sig;
    sigwait(&stop_signals, &sig);
    zmq_ctx_shutdown(ctx);
    return NULL;
}

int main(int argc, char **argv)
{
    const char *endpoint = NULL, *cpu = NULL, *curve_secret = NULL;
    int workers = 2, io_threads = 1;
    for (int i = 1; i < argc; i += 2) {
        if (i + 1 >= argc)
            usage();
        if (!strcmp(argv[i], "--endpoint"))
            endpoint = argv[i + 1];
        else if (!strcmp(argv[i], "--cpu"))
            cpu = argv[i + 1];
        else if (!strcmp(argv[i], "--workers"))
            workers = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--io-threads"))
            io_threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--curve-secret-key"))
            curve_secret = argv[i + 1];
        else
            usage();
    }
    if (!endpoint || workers < 1 || io_threads < 1)
        usage();
    /* Pin and block the stop signals before any thread exists, so every thread inherits
     * both. */
    if (cpu && pin_to(cpu) != 0) {
        fprintf(stderr, "proxy: cannot pin to CPU %s\n", cpu);
        return 2;
    }
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);

    ctx = zmq_ctx_new();
    zmq_ctx_set(ctx, ZMQ_IO_THREADS, io_threads);
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
    if (zmq_bind(front, endpoint) != 0 || zmq_bind(back, BACKEND) != 0) {
        fprintf(stderr, "proxy: bind %s: %s\n", endpoint, zmq_strerror(errno));
        return 2;
    }
    pthread_t *tids = calloc((size_t)workers, sizeof *tids);
    if (!tids)
        return 2;
    for (int i = 0; i < workers; i++)
        pthread_create(&tids[i], NULL, worker, NULL);
    pthread_t sig_tid;
    pthread_create(&sig_tid, NULL, signal_thread, NULL);

    zmq_proxy(front, back, NULL); /* returns -1 with ETERM once the context shuts down */
    int rc = 0;
    if (errno != ETERM) {
        fprintf(stderr, "proxy: %s\n", zmq_strerror(errno));
        rc = 1;
        zmq_ctx_shutdown(ctx);
        pthread_kill(sig_tid, SIGTERM); /* wake the signal thread so it can be joined */
    }
    pthread_join(sig_tid, NULL);
    for (int i = 0; i < workers; i++)
        pthread_join(tids[i], NULL);
    free(tids);
    zmq_close(front);
    zmq_close(back);
    zmq_ctx_term(ctx);
    return rc;
}
