// The reference line beside the device part's 64-byte round trip: what a hand-off between two
// processes costs on this machine, and nothing else. Two processes pass a token back and forth
// through two eventfds, each sleeping in epoll_wait as the device's loop does; a round trip is
// two hand-offs. A userspace vsock device puts one more hand-off on every round trip than QEMU's
// user networking does (the host's bytes wake the device, which wakes QEMU), whatever it is
// written in.
//
// Usage: handoffs COUNT [CPU CPU]. Prints one line per round trip: its nanoseconds. With two
// CPU numbers, this process runs on the first and the other one on the second (the same number
// twice: both on one core). The other process is killed when this one dies (PR_SET_PDEATHSIG).
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <vector>

namespace {

int64_t NowNs() {
  timespec t{};
  clock_gettime(CLOCK_MONOTONIC, &t);
  return int64_t{t.tv_sec} * 1000000000 + t.tv_nsec;
}

// Sleeps until `in` is signalled (EFD_NONBLOCK: the count is read only after epoll says so).
bool Wait(int epoll_fd, int in) {
  epoll_event event{};
  for (;;) {
    const int n = epoll_wait(epoll_fd, &event, 1, 60 * 1000);
    if (n == 1) break;
    if (n == 0 || errno != EINTR) return false;  // 60 s without the peer: give up
  }
  uint64_t count = 0;
  return read(in, &count, sizeof(count)) == sizeof(count);
}

bool Signal(int out) {
  const uint64_t one = 1;
  return write(out, &one, sizeof(one)) == sizeof(one);
}

// A CPU number in [0, CPU_SETSIZE), or -1.
int ParseCpu(const char* text) {
  char* end = nullptr;
  const long cpu = std::strtol(text, &end, 10);
  if (*text == '\0' || *end != '\0' || cpu < 0 || cpu >= CPU_SETSIZE) return -1;
  return static_cast<int>(cpu);
}

bool RunOn(int cpu) {
  if (cpu < 0) return true;  // no placement asked for
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return sched_setaffinity(0, sizeof(set), &set) == 0;
}

int Watch(int fd) {
  const int epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.fd = fd;
  if (epoll_fd < 0 || epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event) != 0) return -1;
  return epoll_fd;
}

}  // namespace

int main(int argc, char** argv) {
  char* end = nullptr;
  const long count = argc == 2 || argc == 4 ? std::strtol(argv[1], &end, 10) : 0;
  const int cpu_parent = argc == 4 ? ParseCpu(argv[2]) : -1;
  const int cpu_child = argc == 4 ? ParseCpu(argv[3]) : -1;
  if ((argc != 2 && argc != 4) || *end != '\0' || count < 1 || count > 10000000 ||
      (argc == 4 && (cpu_parent < 0 || cpu_child < 0))) {
    std::fprintf(stderr, "usage: handoffs COUNT (1 to 10000000) [CPU CPU]\n");
    return 2;
  }
  // Both CPUs must be usable; then the child's is taken before the fork (the child inherits
  // it) and this process moves to its own after.
  for (const int cpu : {cpu_child, cpu_parent}) {
    if (!RunOn(cpu)) {
      std::fprintf(stderr, "handoffs: cannot run on CPU %d: %s\n", cpu, std::strerror(errno));
      return 1;
    }
  }
  if (!RunOn(cpu_child)) return 1;
  const int to_child = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  const int to_parent = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (to_child < 0 || to_parent < 0) {
    std::perror("handoffs: eventfd");
    return 1;
  }
  const pid_t parent = getpid();
  const pid_t child = fork();
  if (child < 0) {
    std::perror("handoffs: fork");
    return 1;
  }
  if (child == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(1);  // the parent died before the line above
    const int epoll_fd = Watch(to_child);
    if (epoll_fd < 0) _exit(1);
    for (long i = 0; i < count; ++i) {
      if (!Wait(epoll_fd, to_child) || !Signal(to_parent)) _exit(1);
    }
    _exit(0);
  }
  RunOn(cpu_parent);  // checked above
  const int epoll_fd = Watch(to_parent);
  std::vector<int64_t> samples;
  samples.reserve(static_cast<size_t>(count));
  bool ok = epoll_fd >= 0;
  for (long i = 0; ok && i < count; ++i) {
    const int64_t start = NowNs();
    ok = Signal(to_child) && Wait(epoll_fd, to_parent);
    samples.push_back(NowNs() - start);
  }
  if (!ok) kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);
  if (!ok || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "handoffs: the round trips did not complete\n");
    return 1;
  }
  for (const int64_t ns : samples) std::printf("%lld\n", static_cast<long long>(ns));
  return 0;
}
