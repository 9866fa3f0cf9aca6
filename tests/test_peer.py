"""Who is at the other end of a socket, on connections within this test process."""

import ipaddress
import os
import socket
import subprocess
import sys

import pytest

from livedump.errors import NotQemu
from livedump.qmp import peer


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_peer_is_the_process_holding_the_other_end(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as server:
        client = socket.create_connection((host, server.getsockname()[1]))
        accepted, _ = server.accept()
        with client, accepted:
            assert peer.owners(client) == {os.getpid()}
            assert peer.owners(client, expected=os.getpid()) == {os.getpid()}


def test_tcp_peer_in_another_process():
    """A child holds the accepted end: it, not this process, is the peer."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        child = subprocess.Popen([sys.executable, "-c", (
            f"import socket, sys; s = socket.socket(fileno={server.fileno()}); "
            "c, _ = s.accept(); print(flush=True); sys.stdin.read()")],
            pass_fds=(server.fileno(),),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            with socket.create_connection(server.getsockname()) as client:
                child.stdout.readline()  # accepted
                assert peer.owners(client) == {child.pid}
                with pytest.raises(NotQemu, match=rf"^tcp:x is served by PID {child.pid} \("
                                                  r".*\), not by QEMU PID 1: livedump talks"):
                    peer.serving(client, "tcp:x", 1)
        finally:
            child.kill()
            child.wait()


def test_unix_peer_is_the_listener():
    a, b = socket.socketpair()
    with a, b:
        assert peer.owners(a) == {os.getpid()}
        with pytest.raises(NotQemu, match=r"^unix:x is served by PID \d+ \(.*\), not by QEMU: "):
            peer.serving(a, "unix:x", None)


@pytest.mark.skipif(sys.byteorder != "little", reason="the words are shown in host order")
def test_proc_net_tcp_addresses():
    """Each 32-bit word in host order, as the kernel prints it."""
    assert peer._parse("0100007F:1F90") == (ipaddress.ip_address("127.0.0.1"), 8080)
    assert peer._parse("00000000000000000000000001000000:0016") == (
        ipaddress.ip_address("::1"), 22)
    # IPv4 through an IPv6 socket (::ffff:127.0.0.1) is IPv4, as getsockname() may not say.
    assert peer._parse("0000000000000000FFFF00000100007F:0050") == (
        ipaddress.ip_address("127.0.0.1"), 80)
