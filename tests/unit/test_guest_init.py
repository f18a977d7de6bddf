"""Guest-side logic that runs without a VM: kernel command line parsing, PID 1's helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsockrpc.guest.cmdline import DEFAULT_PORT, parse_cmdline


def test_default_is_the_agent_port_on_any_cid() -> None:
    cfg = parse_cmdline("console=ttyS0 quiet init=/usr/local/bin/vsockrpc-init")
    assert cfg.listen == (f"vsock:-1:{DEFAULT_PORT}",)


def test_port_and_listen_parameters() -> None:
    assert parse_cmdline("vsockrpc.port=5000").listen == ("vsock:-1:5000",)
    cfg = parse_cmdline("vsockrpc.listen=vsock:-1:1 vsockrpc.listen=unix:/run/a.sock")
    assert cfg.listen == ("vsock:-1:1", "unix:/run/a.sock")


@pytest.mark.parametrize("bad", ["vsockrpc.port=", "vsockrpc.port=x", "vsockrpc.port=0"])
def test_bad_port_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match=r"vsockrpc\.port"):
        parse_cmdline(bad)


def test_load_modules_skips_loaded_ones_and_reports_missing_files(tmp_path: Path) -> None:
    # Only paths that never reach finit_module: one already loaded, one that does not exist.
    from vsockrpc.guest import pid1

    load = tmp_path / "vsockrpc.load"
    load.write_text("/lib/modules/x/kernel/printk.ko\n/nonexistent/zz-no-such.ko\n")
    log: list[str] = []
    assert pid1.load_modules(str(load), log) == 0
    assert log == ["cannot open module /nonexistent/zz-no-such.ko: No such file or directory"]
    assert pid1.load_modules(tmp_path / "absent.load", log) == 0
