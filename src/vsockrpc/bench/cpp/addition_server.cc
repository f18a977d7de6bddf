// The reference line of `vsockrpc bench rpc`: the seed's Addition service in C++ (grpc++ sync
// API), listening on a Unix socket until its stdin reaches EOF. Per call it does the minimum the
// Python servicer does: c = a + b, INVALID_ARGUMENT when the sum does not fit in an int32.
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <iostream>
#include <memory>
#include <string>

#include "vsock_service.grpc.pb.h"

namespace {

class AdditionService final : public popovicu_vsock::VsockService::Service {
  grpc::Status Addition(grpc::ServerContext*, const popovicu_vsock::AdditionRequest* request,
                        popovicu_vsock::AdditionResponse* reply) override {
    const int64_t c = static_cast<int64_t>(request->a()) + request->b();
    if (c < INT32_MIN || c > INT32_MAX) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "sum does not fit in an int32");
    }
    reply->set_c(static_cast<int32_t>(c));
    return grpc::Status::OK;
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: addition_server unix:PATH\n";
    return 2;
  }
  AdditionService service;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(argv[1], grpc::InsecureServerCredentials());
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server) {
    std::cerr << "cannot listen on " << argv[1] << "\n";
    return 1;
  }
  std::string line;
  while (std::getline(std::cin, line)) {
  }
  server->Shutdown();
  return 0;
}
