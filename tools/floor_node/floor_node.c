/* floor_node: the library work of a meshpos node's received sale, in C, for a floor measurement.
 *
 * Not a node. One process per "terminal" of a mesh on loopback: it links to its neighbours over
 * mutually authenticated TLS 1.3 (OpenSSL, Ed25519 certificates of one CA, as meshpos's links),
 * sells at a steady rate (each sale a ~400-byte body signed with Ed25519 by libsodium, as a sale
 * entry), and for every sale it receives: checks the frame, drops a copy it has, verifies the
 * origin's signature, stores it in SQLite (WAL, one row for the entry, one for the sale, one change
 * chunk, as meshpos's store; a group commit with fsync every 50 ms) and pushes it on to its children
 * in the origin's breadth-first tree over the links (what meshpos's push trees settle into: each
 * sale arrives about once). What it leaves out of a node: Automerge's merge, the statuses, the
 * terminal API. tools/bench_floor.py builds and runs it; see its docstring and BENCHMARKS.md.
 *
 * Frame on a link: u32 length (big-endian), then the body: u16 origin, u32 seq, u64 time (ms),
 * PAYLOAD bytes, a 64-byte Ed25519 signature of everything before it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sodium.h>
#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#define MAXN 512
#define MAXLINKS 64
#define PAYLOAD 330
#define HDR 14
#define BODY (HDR + PAYLOAD + 64)
#define RBUF 65536
#define COMMIT_NS 50000000L

typedef struct { int fd; SSL *ssl; int peer; unsigned char rbuf[RBUF]; size_t rlen; } Link;

static int me = -1, n = 0, nlinks = 0, forge_every = 0;
static int port_of[MAXN];
static long own_count = 0, start_ms = 0, deadline_s = 120;
static double rate = 0;
static unsigned char pk[MAXN][32], sk[64];
static unsigned char adjm[MAXN][MAXN];
static short parent_of[MAXN][MAXN];   /* parent_of[origin][v]: v's parent in origin's BFS tree */
static Link links[MAXLINKS];
static unsigned char *seen[MAXN];
static long received = 0, refused = 0, dups = 0, own_done = 0, expected = -1;
static sqlite3 *db;
static sqlite3_stmt *st_entry, *st_sale, *st_chunk;
static int in_tx = 0, commit_fd = -1;  /* a transaction is committed 50 ms after its first write */
static SSL_CTX *ctx;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int expected_in = 0, accepted = 0, listen_fd = -1;

static void die(const char *what) {
    fprintf(stderr, "floor_node %d: %s (%s)\n", me, what, strerror(errno));
    ERR_print_errors_fp(stderr);
    exit(2);
}

static double cpu_s(double *user) {  /* user + system seconds; the user part into *user */
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    return *user + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static long hwm_kb(void) {  /* VmHWM: getrusage's ru_maxrss keeps the forking parent's across exec */
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld kB", &kb) == 1) break;
    if (f) fclose(f);
    return kb;
}

static long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static void exec_sql(const char *sql) {
    char *err = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK) {
        fprintf(stderr, "floor_node %d: sqlite: %s\n", me, err);
        exit(2);
    }
}

static void open_db(const char *path) {
    if (sqlite3_open(path, &db) != SQLITE_OK) die("sqlite open");
    exec_sql("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
             "CREATE TABLE IF NOT EXISTS entries(origin INTEGER, seq INTEGER, body BLOB, received_at INTEGER,"
             " PRIMARY KEY(origin, seq));"
             "CREATE TABLE IF NOT EXISTS sales(origin INTEGER, seq INTEGER, at INTEGER, amount INTEGER,"
             " PRIMARY KEY(origin, seq));"
             "CREATE TABLE IF NOT EXISTS chunks(id INTEGER PRIMARY KEY, shard INTEGER, data BLOB);");
    if (sqlite3_prepare_v2(db, "INSERT INTO entries VALUES(?,?,?,?)", -1, &st_entry, NULL) ||
        sqlite3_prepare_v2(db, "INSERT INTO sales VALUES(?,?,?,?)", -1, &st_sale, NULL) ||
        sqlite3_prepare_v2(db, "INSERT INTO chunks(shard, data) VALUES(?,?)", -1, &st_chunk, NULL))
        die("sqlite prepare");
}

static void step(sqlite3_stmt *st) {
    if (sqlite3_step(st) != SQLITE_DONE) {
        fprintf(stderr, "floor_node %d: sqlite step: %s\n", me, sqlite3_errmsg(db));
        exit(2);
    }
    sqlite3_reset(st);
}

static void store(int origin, uint32_t seq, uint64_t at, const unsigned char *body) {
    if (!in_tx) {
        exec_sql("BEGIN");
        in_tx = 1;
        struct itimerspec it = {{0, 0}, {0, COMMIT_NS}};
        timerfd_settime(commit_fd, 0, &it, NULL);
    }
    sqlite3_bind_int(st_entry, 1, origin); sqlite3_bind_int64(st_entry, 2, seq);
    sqlite3_bind_blob(st_entry, 3, body, BODY, SQLITE_STATIC); sqlite3_bind_int64(st_entry, 4, now_ms());
    step(st_entry);
    sqlite3_bind_int(st_sale, 1, origin); sqlite3_bind_int64(st_sale, 2, seq);
    sqlite3_bind_int64(st_sale, 3, (sqlite3_int64)at); sqlite3_bind_int64(st_sale, 4, 450 + seq % 1000);
    step(st_sale);
    sqlite3_bind_int(st_chunk, 1, origin); sqlite3_bind_blob(st_chunk, 2, body + HDR, PAYLOAD, SQLITE_STATIC);
    step(st_chunk);
}

static void commit(void) {
    if (in_tx) { exec_sql("COMMIT"); in_tx = 0; }
}

static void bfs_trees(void) {
    for (int o = 0; o < n; o++) {
        int queue[MAXN], head = 0, tail = 0;
        for (int v = 0; v < n; v++) parent_of[o][v] = -1;
        parent_of[o][o] = (short)o;
        queue[tail++] = o;
        while (head < tail) {
            int u = queue[head++];
            for (int v = 0; v < n; v++)
                if (adjm[u][v] && parent_of[o][v] < 0) { parent_of[o][v] = (short)u; queue[tail++] = v; }
        }
    }
}

static void send_all(Link *l, const unsigned char *buf, int len) {
    while (len > 0) {
        int w = SSL_write(l->ssl, buf, len);
        if (w > 0) { buf += w; len -= w; continue; }
        int e = SSL_get_error(l->ssl, w);
        if (e != SSL_ERROR_WANT_WRITE && e != SSL_ERROR_WANT_READ) die("tls write");
        struct pollfd p = {l->fd, e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN, 0};
        poll(&p, 1, 1000);
    }
}

static void push_on(int origin, const unsigned char *frame) {
    for (int i = 0; i < nlinks; i++)
        if (parent_of[origin][links[i].peer] == me) send_all(&links[i], frame, 4 + BODY);
}

static void handle(const unsigned char *frame, uint32_t len) {  /* frame: length, then body */
    const unsigned char *body = frame + 4;
    if (len != BODY) { refused++; return; }
    int origin = (body[0] << 8) | body[1];
    uint32_t seq = ((uint32_t)body[2] << 24) | (body[3] << 16) | (body[4] << 8) | body[5];
    uint64_t at = 0;
    for (int i = 0; i < 8; i++) at = (at << 8) | body[6 + i];
    if (origin >= n || origin == me || seq >= (uint32_t)own_count) { refused++; return; }
    if (seen[origin][seq]) { dups++; return; }
    if (crypto_sign_verify_detached(body + BODY - 64, body, BODY - 64, pk[origin]) != 0) { refused++; return; }
    seen[origin][seq] = 1;
    store(origin, seq, at, body);
    push_on(origin, frame);  /* the same bytes: a frame of BODY bytes has this length header */
    received++;
}

static void sell(void) {
    unsigned char frame[4 + BODY], *b = frame + 4;
    uint32_t seq = (uint32_t)own_done++;
    uint64_t at = (uint64_t)now_ms();
    frame[0] = 0; frame[1] = 0; frame[2] = BODY >> 8; frame[3] = BODY & 0xff;
    b[0] = (unsigned char)(me >> 8); b[1] = (unsigned char)me;
    for (int i = 0; i < 4; i++) b[2 + i] = (unsigned char)(seq >> (24 - 8 * i));
    for (int i = 0; i < 8; i++) b[6 + i] = (unsigned char)(at >> (56 - 8 * i));
    for (int i = 0; i < PAYLOAD; i++) b[HDR + i] = (unsigned char)('a' + (seq + i) % 26);
    crypto_sign_detached(b + BODY - 64, NULL, b, BODY - 64, sk);
    if (forge_every && seq % forge_every == (uint32_t)forge_every - 1) b[HDR] ^= 1;  /* signed, then changed */
    else store(me, seq, at, b);
    push_on(me, frame);
}

static int read_link(Link *l) {  /* 0: the link is closed */
    for (;;) {
        int r = SSL_read(l->ssl, l->rbuf + l->rlen, (int)(RBUF - l->rlen));
        if (r <= 0) {
            int e = SSL_get_error(l->ssl, r);
            return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE;
        }
        l->rlen += (size_t)r;
        size_t off = 0;
        while (l->rlen - off >= 4) {
            uint32_t len = ((uint32_t)l->rbuf[off] << 24) | (l->rbuf[off + 1] << 16) | (l->rbuf[off + 2] << 8) | l->rbuf[off + 3];
            if (len > RBUF - 4) return 0;
            if (l->rlen - off < 4 + len) break;
            handle(l->rbuf + off, len);
            off += 4 + len;
        }
        memmove(l->rbuf, l->rbuf + off, l->rlen - off);
        l->rlen -= off;
    }
}

static void add_link(int fd, SSL *ssl, int peer) {
    pthread_mutex_lock(&mu);
    if (nlinks >= MAXLINKS || peer < 0 || peer >= n) die("bad link");
    links[nlinks] = (Link){.fd = fd, .ssl = ssl, .peer = peer};
    nlinks++;
    pthread_mutex_unlock(&mu);
}

static void *acceptor(void *arg) {
    (void)arg;
    while (accepted < expected_in) {
        int fd = accept(listen_fd, NULL, NULL);
        if (fd < 0) die("accept");
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        SSL *ssl = SSL_new(ctx);
        SSL_set_fd(ssl, fd);
        unsigned char hello[2];
        if (SSL_accept(ssl) != 1 || SSL_read(ssl, hello, 2) != 2) die("tls accept");
        add_link(fd, ssl, (hello[0] << 8) | hello[1]);
        accepted++;
    }
    return NULL;
}

static void dial(int peer) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port_of[peer])};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int tries = 0;; tries++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            SSL *ssl = SSL_new(ctx);
            SSL_set_fd(ssl, fd);
            unsigned char hello[2] = {(unsigned char)(me >> 8), (unsigned char)me};
            if (SSL_connect(ssl) != 1 || SSL_write(ssl, hello, 2) != 2) die("tls connect");
            add_link(fd, ssl, peer);
            return;
        }
        close(fd);
        if (tries > 600) die("connect");
        usleep(50000);
    }
}

static int timer_at(long first_ns_abs, long interval_ns) {
    int fd = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK);
    struct itimerspec it = {{interval_ns / 1000000000L, interval_ns % 1000000000L},
                            {first_ns_abs / 1000000000L, first_ns_abs % 1000000000L}};
    if (fd < 0 || timerfd_settime(fd, TFD_TIMER_ABSTIME, &it, NULL)) die("timerfd");
    return fd;
}

int main(int argc, char **argv) {
    const char *ports = NULL, *cert = NULL, *key = NULL, *ca = NULL, *dbpath = NULL, *out = NULL, *edges = NULL, *dials = "";
    static struct option opts[] = {
        {"id", 1, 0, 'i'}, {"n", 1, 0, 'n'}, {"ports", 1, 0, 'p'}, {"edges", 1, 0, 'e'},
        {"dial", 1, 0, 'd'}, {"rate", 1, 0, 'r'}, {"count", 1, 0, 'c'}, {"start-ms", 1, 0, 's'},
        {"forge-every", 1, 0, 'f'}, {"cert", 1, 0, 'C'}, {"key", 1, 0, 'K'}, {"ca", 1, 0, 'A'},
        {"db", 1, 0, 'D'}, {"out", 1, 0, 'o'}, {"deadline-s", 1, 0, 'T'}, {"expect", 1, 0, 'E'},
        {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'i': me = atoi(optarg); break;
        case 'n': n = atoi(optarg); break;
        case 'p': ports = optarg; break;
        case 'e': edges = optarg; break;
        case 'd': dials = optarg; break;
        case 'r': rate = atof(optarg); break;
        case 'c': own_count = atol(optarg); break;
        case 's': start_ms = atol(optarg); break;
        case 'f': forge_every = atoi(optarg); break;
        case 'C': cert = optarg; break;
        case 'K': key = optarg; break;
        case 'A': ca = optarg; break;
        case 'D': dbpath = optarg; break;
        case 'o': out = optarg; break;
        case 'T': deadline_s = atol(optarg); break;
        case 'E': expected = atol(optarg); break;
        default: fprintf(stderr, "usage: see tools/bench_floor.py\n"); return 2;
        }
    }
    if (me < 0 || n < 2 || n > MAXN || me >= n || !edges || !ports || !cert || !key || !ca || !dbpath || !out ||
        rate <= 0 || own_count <= 0 || !start_ms) {
        fprintf(stderr, "floor_node: missing or bad arguments (see tools/bench_floor.py)\n");
        return 2;
    }
    if (sodium_init() < 0) die("sodium");
    for (int i = 0; i < n; i++) {
        unsigned char seed[32] = "floor-node-seed-";
        seed[16] = (unsigned char)(i >> 8); seed[17] = (unsigned char)i;
        unsigned char skey[64];
        crypto_sign_seed_keypair(pk[i], skey, seed);
        if (i == me) memcpy(sk, skey, 64);
        seen[i] = calloc((size_t)own_count, 1);
    }
    int np = 0;
    for (const char *p = ports; *p && np < n;) {  /* "port,port,...": node i listens on the i-th */
        int port, used;
        if (sscanf(p, "%d%n", &port, &used) != 1 || port <= 0 || port > 65535) die("bad --ports");
        port_of[np++] = port;
        p += used;
        if (*p == ',') p++;
    }
    if (np != n) die("--ports must name one port per node");
    for (const char *p = edges; *p;) {  /* "a-b,a-b,..." */
        int a, b, used;
        if (sscanf(p, "%d-%d%n", &a, &b, &used) != 2 || a < 0 || b < 0 || a >= n || b >= n) die("bad --edges");
        adjm[a][b] = adjm[b][a] = 1;
        if (b == me) expected_in++;
        p += used;
        if (*p == ',') p++;
    }
    bfs_trees();
    open_db(dbpath);
    commit_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    if (commit_fd < 0) die("timerfd");

    ctx = SSL_CTX_new(TLS_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    if (SSL_CTX_use_certificate_file(ctx, cert, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) die("tls context");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);

    listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port_of[me])};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listen_fd, (struct sockaddr *)&a, sizeof a) || listen(listen_fd, 64)) die("listen");
    pthread_t th;
    pthread_create(&th, NULL, acceptor, NULL);
    for (const char *p = dials; *p;) {
        int peer, used;
        if (sscanf(p, "%d%n", &peer, &used) != 1) die("bad --dial");
        dial(peer);
        p += used;
        if (*p == ',') p++;
    }
    pthread_join(th, NULL);
    close(listen_fd);

    int ep = epoll_create1(0);
    for (int i = 0; i < nlinks; i++) {
        fcntl(links[i].fd, F_SETFL, fcntl(links[i].fd, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, links[i].fd, &ev);
    }
    long interval = (long)(1e9 / rate);
    long first = start_ms * 1000000L + (long)((double)interval * me / n);
    int sale_fd = timer_at(first, interval);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 1000};
    epoll_ctl(ep, EPOLL_CTL_ADD, sale_fd, &ev);
    ev.data.u32 = 1001;
    epoll_ctl(ep, EPOLL_CTL_ADD, commit_fd, &ev);
    if (expected <= 0) expected = (n - 1) * own_count;  /* --expect: fewer where a peer forges */

    while (now_ms() < start_ms) usleep(1000);
    double user0, user1 = 0, cpu0 = cpu_s(&user0), cpu1 = -1;
    long t0 = now_ms(), t1 = 0;
    int written = 0;
    for (;;) {
        struct epoll_event evs[64];
        int k = epoll_wait(ep, evs, 64, 200);
        for (int j = 0; j < k; j++) {
            uint32_t tag = evs[j].data.u32;
            uint64_t ticks;
            if (tag == 1000) {
                if (read(sale_fd, &ticks, 8) == 8)
                    while (ticks-- && own_done < own_count) sell();
            } else if (tag == 1001) {
                if (read(commit_fd, &ticks, 8) == 8) commit();
            } else if (!read_link(&links[tag])) {
                epoll_ctl(ep, EPOLL_CTL_DEL, links[tag].fd, NULL);
            }
        }
        if (cpu1 < 0 && own_done == own_count && received >= expected) {
            commit();
            cpu1 = cpu_s(&user1);
            t1 = now_ms();
        }
        if (!written && (cpu1 >= 0 || now_ms() > start_ms + deadline_s * 1000)) {
            commit();
            if (cpu1 < 0) { cpu1 = cpu_s(&user1); t1 = now_ms(); }
            char tmp[4096];
            snprintf(tmp, sizeof tmp, "%s.tmp", out);
            FILE *f = fopen(tmp, "w");
            if (!f) die("result file");
            fprintf(f, "{\"id\": %d, \"links\": %d, \"own\": %ld, \"received\": %ld, \"expected\": %ld, "
                       "\"refused\": %ld, \"dups\": %ld, \"cpu_s\": %.6f, \"user_s\": %.6f, \"wall_s\": %.3f, "
                       "\"max_rss_kb\": %ld}\n",
                    me, nlinks, own_done, received, expected, refused, dups, cpu1 - cpu0, user1 - user0,
                    (t1 - t0) / 1000.0,
                    hwm_kb());
            fclose(f);
            rename(tmp, out);
            written = 1;
        }
    }
}
