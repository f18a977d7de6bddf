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
#include <sys/wait.h>
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
    }
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
