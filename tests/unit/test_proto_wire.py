"""The Addition service keeps the wire names of the original C++ demo."""

from __future__ import annotations


def test_addition_wire_names() -> None:
    """Package, service, method and field numbers stay those of the original C++ demo."""
    from vsockrpc.proto import vsock_service_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["VsockService"]
    assert service.full_name == "popovicu_vsock.VsockService"
    method = service.methods_by_name["Addition"]
    assert method.input_type.full_name == "popovicu_vsock.AdditionRequest"
    assert method.output_type.full_name == "popovicu_vsock.AdditionResponse"
    req = pb.AdditionRequest.DESCRIPTOR.fields_by_name
    assert (req["a"].number, req["b"].number) == (1, 2)
    assert pb.AdditionResponse.DESCRIPTOR.fields_by_name["c"].number == 1
    # int32 a=5, b=7 encodes as field 1 varint 5, field 2 varint 7.
    assert pb.AdditionRequest(a=5, b=7).SerializeToString() == b"\x08\x05\x10\x07"
