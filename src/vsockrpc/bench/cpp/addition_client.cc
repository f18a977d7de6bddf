// The client of `vsockrpc bench rpc`: WARMUP unmeasured calls, then CALLS Addition(5, 7) round
// trips on one channel, each printed in nanoseconds on its own line (steady clock).
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <vector>

#include "vsock_service.grpc.pb.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: addition_client unix:PATH WARMUP CALLS\n";
    return 2;
  }
  const long warmup = std::atol(argv[2]);
  const long calls = std::atol(argv[3]);
  auto channel = grpc::CreateChannel(argv[1], grpc::InsecureChannelCredentials());
  auto stub = popovicu_vsock::VsockService::NewStub(channel);
  popovicu_vsock::AdditionRequest request;
  request.set_a(5);
  request.set_b(7);
  std::vector<long long> samples;
  samples.reserve(static_cast<size_t>(calls));
  for (long i = 0; i < warmup + calls; i++) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    popovicu_vsock::AdditionResponse reply;
    const auto start = std::chrono::steady_clock::now();
    grpc::Status status = stub->Addition(&context, request, &reply);
    const auto stop = std::chrono::steady_clock::now();
    if (!status.ok() || reply.c() != 12) {
      std::cerr << "Addition failed: " << status.error_code() << " " << status.error_message()
                << "\n";
      return 1;
    }
    if (i >= warmup) {
      samples.push_back(
          std::chrono::duration_cast<std::chrono::nanoseconds>(stop - start).count());
    }
  }
  for (long long ns : samples) std::printf("%lld\n", ns);
  return 0;
}
