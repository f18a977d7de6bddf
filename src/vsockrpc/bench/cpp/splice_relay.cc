// The floor line of `vsockrpc bench relay`: the same hop as vsockrpc's relay (accept, connect
// to the target, one splice(2) pump per direction through a pipe) with no Python in it. If it
// costs what the Python relay costs, the extra latency is the hop (a thread wake per direction
// per call), not the interpreter. Usage: splice_relay LISTEN_PATH TARGET_PATH; it listens with
// mode 0600 (umask 077) and exits when its stdin reaches EOF.
#include <fcntl.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

constexpr size_t kPipeSize = 256 * 1024;  // the Python relay's BUFFER_SIZE
const char* g_target = nullptr;

struct Direction {
  int src;
  int dst;
};

void* Pump(void* arg) {
  const Direction* d = static_cast<Direction*>(arg);
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) != 0) {
    shutdown(d->src, SHUT_RDWR);
    shutdown(d->dst, SHUT_RDWR);
    return nullptr;
  }
  fcntl(pipe_fds[1], F_SETPIPE_SZ, static_cast<int>(kPipeSize));
  for (;;) {
    ssize_t n = splice(d->src, nullptr, pipe_fds[1], nullptr, kPipeSize, 0);
    if (n <= 0) break;
    while (n > 0) {
      const ssize_t m = splice(pipe_fds[0], nullptr, d->dst, nullptr, n, 0);
      if (m <= 0) {
        shutdown(d->src, SHUT_RDWR);
        n = -1;
        break;
      }
      n -= m;
    }
    if (n < 0) break;
  }
  shutdown(d->dst, SHUT_WR);
  close(pipe_fds[0]);
  close(pipe_fds[1]);
  return nullptr;
}

sockaddr_un UnixAddress(const char* path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
  return addr;
}

void* Connection(void* arg) {
  const int client = static_cast<int>(reinterpret_cast<intptr_t>(arg));
  const int server = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const sockaddr_un addr = UnixAddress(g_target);
  if (server < 0 || connect(server, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    if (server >= 0) close(server);
    close(client);
    return nullptr;
  }
  Direction up{client, server};
  Direction down{server, client};
  pthread_t other;
  if (pthread_create(&other, nullptr, Pump, &down) == 0) {
    Pump(&up);
    pthread_join(other, nullptr);
  }
  close(client);
  close(server);
  return nullptr;
}

void* ExitAtEof(void*) {
  char buf[64];
  while (read(STDIN_FILENO, buf, sizeof(buf)) > 0) {
  }
  std::exit(0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || std::strlen(argv[1]) >= sizeof(sockaddr_un::sun_path)) {
    std::fprintf(stderr, "usage: splice_relay LISTEN_PATH TARGET_PATH\n");
    return 2;
  }
  g_target = argv[2];
  umask(077);
  const int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const sockaddr_un addr = UnixAddress(argv[1]);
  if (listener < 0 || bind(listener, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(listener, 128) != 0) {
    std::perror("splice_relay: listen");
    return 1;
  }
  pthread_t watcher;
  pthread_create(&watcher, nullptr, ExitAtEof, nullptr);
  for (;;) {
    const int client = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (client < 0) continue;
    pthread_t worker;
    if (pthread_create(&worker, nullptr, Connection, reinterpret_cast<void*>(intptr_t{client})) == 0) {
      pthread_detach(worker);
    } else {
      close(client);
    }
  }
}
