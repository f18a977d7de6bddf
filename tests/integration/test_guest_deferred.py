"""Stand-ins for modules the agent's server never uses (``vsockrpc.guest.deferred``), each case
in a fresh interpreter: the test process has asyncio loaded already."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import vsockrpc

SRC = str(Path(vsockrpc.__file__).parent.parent)


def _run(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={"PYTHONPATH": SRC, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_imports_in_the_window_bind_a_stand_in_that_loads_the_real_module_on_use() -> None:
    out = _run(
        """
        import sys
        from vsockrpc.guest.deferred import Deferred, deferring
        with deferring():
            import asyncio
        print(type(asyncio) is Deferred, "asyncio" in sys.modules, "_asyncio" in sys.modules)
        async def three():
            return 3
        print(asyncio.run(three()))
        real = sys.modules["asyncio"]
        print(type(real) is not Deferred, asyncio.Queue is real.Queue)
        import asyncio.events  # a submodule after the window: one copy of it
        print(sys.modules["asyncio.events"] is real.events)
        """
    )
    assert out.split() == ["True", "False", "False", "3", "True", "True", "True"]


def test_after_the_window_an_import_is_an_ordinary_one() -> None:
    out = _run(
        """
        import sys
        from vsockrpc.guest.deferred import Deferred, deferring
        with deferring():
            import asyncio as early
        import asyncio
        print(type(asyncio) is not Deferred, early.Queue is asyncio.Queue)
        """
    )
    assert out.split() == ["True", "True"]


def test_a_use_inside_the_window_imports_the_module_for_real() -> None:
    out = _run(
        """
        import sys
        from vsockrpc.guest.deferred import Deferred, deferring
        with deferring():
            import asyncio
            queue = asyncio.Queue  # a use: loads it
            real = sys.modules["asyncio"]
            print(type(real) is not Deferred, queue is real.Queue)
        print(type(sys.modules["asyncio"]) is not Deferred)
        """
    )
    assert out.split() == ["True", "True", "True"]


def test_a_module_already_imported_is_left_alone() -> None:
    out = _run(
        """
        import sys, asyncio
        from vsockrpc.guest.deferred import Deferred, deferring
        with deferring():
            import asyncio as again
        print(again is asyncio, sys.modules["asyncio"] is asyncio)
        """
    )
    assert out.split() == ["True", "True"]


def test_threads_using_a_stand_in_at_once_all_get_the_one_real_module() -> None:
    out = _run(
        """
        import sys, threading
        from vsockrpc.guest.deferred import deferring
        with deferring():
            import asyncio
        start = threading.Barrier(8)
        got, errors = [], []
        def use():
            start.wait()
            try:
                got.append(asyncio.Queue)
            except BaseException as err:
                errors.append(repr(err))
        threads = [threading.Thread(target=use) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        real = sys.modules["asyncio"]
        print(len(got), len({id(q) for q in got}), errors == [], got[0] is real.Queue)
        """
    )
    assert out.split() == ["8", "1", "True", "True"]


def test_grpc_and_the_agent_services_import_without_asyncio() -> None:
    # What the agent's server imports (vsockrpc.guest.server): grpcio, its health and reflection
    # packages and the services. Any of them reading an asyncio attribute at import would load
    # it; and protobuf's pure-Python messages stay unloaded behind the upb backend.
    out = _run(
        """
        import sys
        from vsockrpc.guest.deferred import deferring
        from concurrent import futures
        with deferring():
            import grpc
            from vsockrpc import rpc
            from vsockrpc.services import served
            from vsockrpc.services.agent import health_and_reflection
            server = grpc.server(futures.ThreadPoolExecutor(1))
            health_and_reflection(["x.Y"])(server)  # imports and registers both
        from google.protobuf.internal import api_implementation
        print(api_implementation.Type())
        loaded = ("asyncio", "ssl", "grpc.aio", "google.protobuf.internal.python_message")
        print(" ".join(m for m in loaded if m in sys.modules) or "-")
        """
    )
    assert out.split() == ["upb", "-"]


def test_protobufs_pure_python_backend_gets_its_messages_through_the_stand_in() -> None:
    # The backend that does use python_message: it is loaded on its first use, in the window.
    out = _run(
        """
        import sys
        from vsockrpc.guest.deferred import Deferred, deferring
        with deferring():
            from vsockrpc.agent.v1 import agent_pb2 as pb
        from google.protobuf.internal import api_implementation
        request = pb.ExecRequest(start=pb.ExecStart(argv=[b"echo", b"hi"]))
        again = pb.ExecRequest.FromString(request.SerializeToString())
        module = sys.modules["google.protobuf.internal.python_message"]
        same = list(again.start.argv) == [b"echo", b"hi"]
        print(api_implementation.Type(), same, type(module) is not Deferred)
        """,
        PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python",
    )
    assert out.split() == ["python", "True", "True"]
