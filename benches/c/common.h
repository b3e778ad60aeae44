/* common.h: what the C benchmark programs (loadgen, overload, proxy, router_echo) share:
 * CPU pinning, the usage exit, number flags, clocks, the stop-signal thread that shuts a
 * libzmq context down, the latency histogram and JSON string output. Nothing here comes from
 * the broker: these programs are its independent yardstick.
 *
 * Header-only on purpose (each program is one `gcc x.c` in build.sh); every function is
 * `static inline` so a program that does not use one gets no unused-function warning. */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

/* ---- command line -------------------------------------------------------------------- */

/* Prints the program's usage text and exits 2 (a bad flag is the caller's error). */
__attribute__((noreturn)) static inline void usage_exit(const char *text)
{
    fputs(text, stderr);
    exit(2);
}

/* A non-negative number flag; "5s" is accepted for "5". Returns -1 if it is not one. */
static inline double parse_number(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s)
        return -1;
    if (*end == 's' && end[1] == 0)
        end++;
    if (*end || v < 0)
        return -1;
    return v;
}

/* Walks a command line of "--flag value" pairs and bare switches. `*i` starts at 0; each call
 * returns the next flag and sets `*value` to its value, or to NULL when the flag is one of
 * the `switches` (a NULL-terminated list); NULL at the end. A flag missing its value is the
 * usage exit. */
static inline const char *next_flag(int argc, char **argv, int *i, const char *const *switches,
                                    const char **value, const char *usage)
{
    if (++*i >= argc)
        return NULL;
    const char *flag = argv[*i];
    *value = NULL;
    for (const char *const *s = switches; s && *s; s++)
        if (!strcmp(flag, *s))
            return flag;
    if (*i + 1 >= argc)
        usage_exit(usage);
    *value = argv[++*i];
    return flag;
}

/* parse_number, or the usage exit for a value that is not a number. */
static inline double number_arg(const char *s, const char *usage)
{
    double v = parse_number(s);
    if (v < 0)
        usage_exit(usage);
    return v;
}

/* Restricts the calling thread (and the threads it starts later) to a CPU list such as
 * "0" or "0,1". Call it before any thread exists so libzmq's threads inherit the mask. */
static inline int pin_to(const char *list)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    char *copy = strdup(list), *save = NULL;
    if (!copy)
        return -1;
    int n = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *end;
        long cpu = strtol(tok, &end, 10);
        if (end == tok || *end || cpu < 0 || cpu >= CPU_SETSIZE) {
            free(copy);
            return -1;
        }
        CPU_SET((int)cpu, &set);
        n++;
    }
    free(copy);
    return n ? sched_setaffinity(0, sizeof set, &set) : -1;
}

/* ---- clocks -------------------------------------------------------------------------- */

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void sleep_until(uint64_t deadline)
{
    struct timespec ts = {(time_t)(deadline / 1000000000u), (long)(deadline % 1000000000u)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

/* ---- stop signals -------------------------------------------------------------------- */

/* Servers block SIGTERM/SIGINT before any thread exists (every thread inherits the mask)
 * and let one thread wait for them: the signal becomes zmq_ctx_shutdown, which ends every
 * blocking libzmq call with ETERM, so the program stops through its normal exit path. */
static sigset_t stop_signals;

static inline void block_stop_signals(void)
{
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
}

static inline void *stop_thread_main(void *ctx)
{
    int sig;
    sigwait(&stop_signals, &sig);
    zmq_ctx_shutdown(ctx);
    return NULL;
}

/* Starts the thread that turns a stop signal into a shutdown of `ctx`. */
static inline int start_stop_thread(pthread_t *tid, void *ctx)
{
    return pthread_create(tid, NULL, stop_thread_main, ctx);
}

/* Ends the stop thread when the program stops for another reason (an error), so it can be
 * joined: the signal is blocked everywhere, so it goes to the waiting thread. */
static inline void end_stop_thread(pthread_t tid)
{
    pthread_kill(tid, SIGTERM);
}

/* ---- servers ------------------------------------------------------------------------- */

/* The flags both server programs take. */
typedef struct {
    const char *endpoint, *cpu;
    double io_threads;
} server_flags_t;

/* Takes `flag` if it is --endpoint, --cpu or --io-threads; returns 0 if it is none of them. */
static inline int server_flag(server_flags_t *f, const char *flag, const char *value,
                              const char *usage)
{
    if (!strcmp(flag, "--endpoint"))
        f->endpoint = value;
    else if (!strcmp(flag, "--cpu"))
        f->cpu = value;
    else if (!strcmp(flag, "--io-threads"))
        f->io_threads = number_arg(value, usage);
    else
        return 0;
    return 1;
}

/* Checks the flags, pins the process and blocks the stop signals before any thread exists
 * (so every thread, libzmq's too, inherits both), and makes the context. Exits 2 on a bad
 * setting, naming `prog`. */
static inline void *server_context(const server_flags_t *f, const char *prog, const char *usage)
{
    if (!f->endpoint || f->io_threads < 1)
        usage_exit(usage);
    if (f->cpu && pin_to(f->cpu) != 0) {
        fprintf(stderr, "%s: cannot pin to CPU %s\n", prog, f->cpu);
        exit(2);
    }
    block_stop_signals();
    void *ctx = zmq_ctx_new();
    if (!ctx || zmq_ctx_set(ctx, ZMQ_IO_THREADS, (int)f->io_threads) != 0) {
        fprintf(stderr, "%s: context: %s\n", prog, zmq_strerror(errno));
        exit(2);
    }
    return ctx;
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

static inline unsigned hist_index(uint64_t v)
{
    if (v > HIST_MAX_NS)
        v = HIST_MAX_NS;
    int msb = 63 - __builtin_clzll(v | 1);
    int e = msb > HIST_SUB_BITS ? msb - HIST_SUB_BITS : 0;
    return (unsigned)(HIST_SUB * (unsigned)e + (unsigned)(v >> e));
}

/* The highest value a bucket stands for (HdrHistogram's "highest equivalent value"). */
static inline uint64_t hist_high(unsigned idx)
{
    if (idx < 2 * HIST_SUB)
        return idx;
    unsigned e = (idx >> HIST_SUB_BITS) - 1;
    uint64_t m = idx - HIST_SUB * e;
    return ((m + 1) << e) - 1;
}

static inline void hist_record(hist_t *h, uint64_t v)
{
    h->counts[hist_index(v)]++;
    h->total++;
    if (v > h->max)
        h->max = v;
}

static inline void hist_merge(hist_t *into, const hist_t *from)
{
    for (unsigned i = 0; i < HIST_BUCKETS; i++)
        into->counts[i] += from->counts[i];
    into->total += from->total;
    if (from->max > into->max)
        into->max = from->max;
}

static inline double hist_percentile_us(const hist_t *h, double p)
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

/* Prints {"p50":..,"p90":..,"p99":..,"p999":..,"max":..,"count":..} in microseconds. */
static inline void hist_print_json(const hist_t *h)
{
    printf("{\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"p999\":%.1f,\"max\":%.1f,\"count\":%llu}",
           hist_percentile_us(h, 50), hist_percentile_us(h, 90), hist_percentile_us(h, 99),
           hist_percentile_us(h, 99.9), (double)h->max / 1000.0, (unsigned long long)h->total);
}

/* ---- error codes, counted by name ---------------------------------------------------- */

#define MAX_CODES 16
#define CODE_LEN 48
typedef struct {
    char code[CODE_LEN];
    uint64_t n;
} code_count_t;

/* Adds `n` to the count of `data` (an ERR reply's code frame) in `codes` (MAX_CODES + 1
 * entries: the last collects codes beyond the first MAX_CODES as "(other)"). */
static inline void add_code(code_count_t *codes, int *ncodes, const void *data, size_t len,
                            uint64_t n)
{
    if (len >= CODE_LEN)
        len = CODE_LEN - 1;
    for (int i = 0; i < *ncodes; i++)
        if (strlen(codes[i].code) == len && memcmp(codes[i].code, data, len) == 0) {
            codes[i].n += n;
            return;
        }
    code_count_t *c = *ncodes < MAX_CODES ? &codes[(*ncodes)++] : &codes[MAX_CODES];
    if (c->code[0] == 0) {
        if (c == &codes[MAX_CODES])
            strcpy(c->code, "(other)");
        else
            memcpy(c->code, data, len);
    }
    c->n += n;
}

/* Adds every count of `from` (a thread's) into `into`. */
static inline void merge_codes(code_count_t *into, int *ninto, const code_count_t *from)
{
    for (int j = 0; j <= MAX_CODES; j++)
        if (from[j].n)
            add_code(into, ninto, from[j].code, strlen(from[j].code), from[j].n);
}

/* Prints a JSON string: the codes are data from the server, so they are escaped. */
static inline void print_json_string(const char *s)
{
    putchar('"');
    for (const char *p = s; *p; p++)
        if (*p == '"' || *p == '\\')
            printf("\\%c", *p);
        else if ((unsigned char)*p < 0x20 || (unsigned char)*p > 0x7e)
            putchar('?');
        else
            putchar(*p);
    putchar('"');
}

/* Prints {"CODE":N,...} for the codes counted. */
static inline void print_codes_json(const code_count_t *codes, int ncodes)
{
    putchar('{');
    int first = 1;
    for (int j = 0; j <= MAX_CODES; j++) {
        if (!codes[j].n || (j >= ncodes && j != MAX_CODES))
            continue;
        if (!first)
            putchar(',');
        first = 0;
        print_json_string(codes[j].code);
        printf(":%llu", (unsigned long long)codes[j].n);
    }
    putchar('}');
}

#endif
