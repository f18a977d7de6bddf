/* guest_probe: the tiny in-guest test program for the vsock device VM tests and benchmark.
 *
 * Built static with gcc at fixture time and put into the test initramfs.
 *
 *   guest_probe cid          print "PROBE-CID <n>" (ioctl IOCTL_VM_SOCKETS_GET_LOCAL_CID, 0x7b9)
 *   guest_probe serve PORT   listen on AF_VSOCK PORT and TCP PORT; one connection at a time per
 *                            listener; each connection starts with a command:
 *     'E'                    echo everything until EOF (round-trip latency)
 *     'S' u64 n              read n bytes, reply crc32 (le32) of them (host -> guest)
 *     'G' u64 n u32 seed     send n pseudo-random bytes, then their crc32 (le32) (guest -> host)
 *     's' u64 n / 'g' u64 n  the same without checksums, reply/trailer 0 (benchmark: the
 *                            transport, not the guest's crc32 under TCG)
 *     'R'                    reply R-OK, wait for the host to close, reboot the guest
 *     'C' u32 port           connect to CID 2 port (from inside the guest), send
 *                            "hello from guest\n", read a reply line, forward it to the caller
 *     'X' u8 family u32 addr u32 port u8 op u64 n
 *                            client role (guest <-> guest benchmark): connect from this guest
 *                            to another probe's listener, family 'v' (AF_VSOCK, addr = CID) or
 *                            't' (TCP, addr = IPv4 in host byte order, e.g. 0x0a000202 for
 *                            user networking's 10.0.2.2), then run op against it:
 *                              's' / 'S'  send n bytes with that command (this guest -> peer;
 *                                         'S': xorshift data, crc32 of it vs the peer's reply)
 *                              'g' / 'G'  receive n bytes with that command (peer -> this
 *                                         guest; 'G': crc32 of what arrived vs the trailer)
 *                              'E'        n round trips of 64 bytes through the peer's echo
 *                            timed inside this guest with clock_gettime(CLOCK_MONOTONIC), and
 *                            reply i32 status (0, an errno, or -1: the peer broke the
 *                            protocol), u32 crc_local, u32 crc_peer (0 unless 'S'/'G'),
 *                            u32 count, count x u64 nanoseconds: one (command sent -> the
 *                            peer's reply or trailer read) for a stream, one per round trip for
 *                            'E'. The connect itself is not timed.
 *
 * Inside the guest, connect() on AF_VSOCK is allowed (the host never does it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* zlib-compatible crc32, so the host checks with zlib.crc32 */
static uint32_t crc_update(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    while (n--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static int read_full(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n) {
    size_t put = 0;
    while (put < n) {
        ssize_t w = write(fd, (const char *)buf + put, n - put);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        put += (size_t)w;
    }
    return 0;
}

static unsigned char buf[1 << 16];

static void client(int fd);

static void handle(int fd) {
    char cmd;
    if (read_full(fd, &cmd, 1)) return;
    if (cmd == 'E') {
        for (;;) {
            ssize_t r = read(fd, buf, sizeof buf);
            if (r <= 0) return;
            if (write_full(fd, buf, (size_t)r)) return;
        }
    } else if (cmd == 'S' || cmd == 's') {
        uint64_t n;
        if (read_full(fd, &n, 8)) return;
        uint32_t crc = 0;
        while (n > 0) {
            ssize_t r = read(fd, buf, n < sizeof buf ? n : sizeof buf);
            if (r <= 0) return;
            if (cmd == 'S') crc = crc_update(crc, buf, (size_t)r);
            n -= (uint64_t)r;
        }
        write_full(fd, &crc, 4);
    } else if (cmd == 'g') {
        uint64_t n;
        if (read_full(fd, &n, 8)) return;
        memset(buf, 'g', sizeof buf);
        while (n > 0) {
            size_t chunk = n < sizeof buf ? (size_t)n : sizeof buf;
            if (write_full(fd, buf, chunk)) return;
            n -= chunk;
        }
        uint32_t zero = 0;
        write_full(fd, &zero, 4);
    } else if (cmd == 'G') {
        uint64_t n;
        uint32_t seed;
        if (read_full(fd, &n, 8) || read_full(fd, &seed, 4)) return;
        uint32_t x = seed ? seed : 1, crc = 0;
        for (size_t i = 0; i < sizeof buf; i += 4) {  /* xorshift32 pattern, one buffer */
            x ^= x << 13; x ^= x >> 17; x ^= x << 5;
            memcpy(buf + i, &x, 4);
        }
        while (n > 0) {
            size_t chunk = n < sizeof buf ? (size_t)n : sizeof buf;
            crc = crc_update(crc, buf, chunk);
            if (write_full(fd, buf, chunk)) return;
            n -= chunk;
            buf[0]++;  /* vary the data between chunks */
        }
        write_full(fd, &crc, 4);
    } else if (cmd == 'R') {
        write_full(fd, "R-OK\n", 5);
        /* Reboot only once the host has read the reply and closed: bytes still in the tx ring
         * when the guest resets the device are legitimately dropped with the connection. */
        char c;
        while (read(fd, &c, 1) > 0) {
        }
        sync();
        reboot(RB_AUTOBOOT);
    } else if (cmd == 'C') {
        uint32_t port;
        if (read_full(fd, &port, 4)) return;
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = 2, .svm_port = port};
        char reply[128];
        int len;
        if (connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) {
            len = snprintf(reply, sizeof reply, "C-ERR %d\n", errno);
        } else {
            const char *hello = "hello from guest\n";
            write_full(s, hello, strlen(hello));
            char line[96];
            size_t got = 0;
            while (got < sizeof line - 1 && read(s, line + got, 1) == 1 && line[got] != '\n') got++;
            line[got] = 0;
            len = snprintf(reply, sizeof reply, "C-OK %s\n", line);
        }
        close(s);
        write_full(fd, reply, (size_t)len);
    } else if (cmd == 'X') {
        client(fd);
    }
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* xorshift32 over one buffer, as 'G' fills it */
static void pattern(uint32_t seed) {
    uint32_t x = seed ? seed : 1;
    for (size_t i = 0; i < sizeof buf; i += 4) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        memcpy(buf + i, &x, 4);
    }
}

#define MAX_ECHOES 100000
/* a failed read/write: its errno (e.g. EAGAIN when SO_RCVTIMEO expired), or -1 for an EOF */
#define FAIL (errno ? errno : -1)
static uint64_t samples[MAX_ECHOES];

/* 'X': the client role; fills samples[0..*count), returns 0 / an errno / -1 (protocol). */
static int client_op(int s, char op, uint64_t n, uint32_t *crc_local, uint32_t *crc_peer,
                     uint32_t *count) {
    unsigned char head[13];
    head[0] = (unsigned char)op;
    memcpy(head + 1, &n, 8);
    if (op == 'E') {
        if (n > MAX_ECHOES) return EINVAL;
        unsigned char msg[64];
        memset(msg, 'p', sizeof msg);
        if (write_full(s, head, 1)) return FAIL;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t t0 = now_ns();
            if (write_full(s, msg, sizeof msg) || read_full(s, msg, sizeof msg)) return FAIL;
            samples[i] = now_ns() - t0;
        }
        *count = (uint32_t)n;
        return 0;
    }
    uint64_t t0 = now_ns();
    if (op == 's' || op == 'S') {
        if (write_full(s, head, 9)) return FAIL;
        uint32_t crc = 0;
        if (op == 'S') pattern(7); else memset(buf, 's', sizeof buf);
        for (uint64_t left = n; left > 0;) {
            size_t chunk = left < sizeof buf ? (size_t)left : sizeof buf;
            if (op == 'S') crc = crc_update(crc, buf, chunk);
            if (write_full(s, buf, chunk)) return FAIL;
            left -= chunk;
            if (op == 'S') buf[0]++;  /* vary the data between chunks, as 'G' does */
        }
        if (read_full(s, crc_peer, 4)) return FAIL;
        *crc_local = op == 'S' ? crc : 0;
    } else if (op == 'g' || op == 'G') {
        uint32_t seed = 7;
        memcpy(head + 9, &seed, 4);
        if (write_full(s, head, op == 'G' ? 13 : 9)) return FAIL;
        uint32_t crc = 0;
        for (uint64_t left = n; left > 0;) {
            ssize_t r = read(s, buf, left < sizeof buf ? (size_t)left : sizeof buf);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) return FAIL;
            if (op == 'G') crc = crc_update(crc, buf, (size_t)r);
            left -= (uint64_t)r;
        }
        if (read_full(s, crc_peer, 4)) return FAIL;
        *crc_local = op == 'G' ? crc : 0;
    } else {
        return EINVAL;
    }
    samples[0] = now_ns() - t0;
    *count = 1;
    return 0;
}

static void client(int fd) {
    unsigned char family, op;
    uint32_t addr, port;
    uint64_t n;
    if (read_full(fd, &family, 1) || read_full(fd, &addr, 4) || read_full(fd, &port, 4) ||
        read_full(fd, &op, 1) || read_full(fd, &n, 8))
        return;
    int32_t status = 0;
    uint32_t crc_local = 0, crc_peer = 0, count = 0;
    int s = socket(family == 'v' ? AF_VSOCK : AF_INET, SOCK_STREAM, 0);
    int rc;
    if (s < 0) {
        status = errno;
    } else {
        struct timeval limit = {.tv_sec = 60};  /* a stalled peer ends the op, not the probe */
        setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
        setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
        if (family == 'v') {
            struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = addr, .svm_port = port};
            rc = connect(s, (struct sockaddr *)&a, sizeof a);
        } else {
            int one = 1;
            setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                    .sin_addr.s_addr = htonl(addr)};
            rc = connect(s, (struct sockaddr *)&a, sizeof a);
        }
        if (rc) {
            status = errno;
        } else {
            errno = 0;
            status = client_op(s, (char)op, n, &crc_local, &crc_peer, &count);
        }
        close(s);
    }
    if (status) count = 0;
    write_full(fd, &status, 4);
    write_full(fd, &crc_local, 4);
    write_full(fd, &crc_peer, 4);
    write_full(fd, &count, 4);
    write_full(fd, samples, (size_t)count * 8);
}

static void serve(int family, int port) {
    int s = socket(family, SOCK_STREAM, 0);
    if (s < 0) { perror("socket"); exit(1); }
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (family == AF_VSOCK) {
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
        if (bind(s, (struct sockaddr *)&a, sizeof a)) { perror("bind vsock"); exit(1); }
    } else {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
        if (bind(s, (struct sockaddr *)&a, sizeof a)) { perror("bind tcp"); exit(1); }
    }
    listen(s, 16);
    printf("PROBE-LISTEN %s %d\n", family == AF_VSOCK ? "vsock" : "tcp", port);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        if (family == AF_INET) setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        handle(c);
        close(c);
    }
}

int main(int argc, char **argv) {
    crc_init();
    if (argc >= 2 && !strcmp(argv[1], "cid")) {
        int fd = open("/dev/vsock", O_RDONLY);
        unsigned int cid = 0;
        if (fd < 0 || ioctl(fd, 0x7b9 /* IOCTL_VM_SOCKETS_GET_LOCAL_CID */, &cid) != 0) {
            printf("PROBE-CID-ERR %d\n", errno);
            return 1;
        }
        printf("PROBE-CID %u\n", cid);
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "serve")) {
        int port = atoi(argv[2]);
        if (fork() == 0) serve(AF_INET, port);
        serve(AF_VSOCK, port);
    }
    fprintf(stderr, "usage: guest_probe cid | serve PORT\n");
    return 2;
}
