"""Finding QMP monitors on QEMU command lines as users and libvirt write them."""

from livedump.target import QmpEndpoint, parse_qmp_options


def endpoints(cmdline: str, cwd: str = "/run/vm") -> list[QmpEndpoint]:
    return parse_qmp_options(["qemu-system-x86_64", *cmdline.split()], cwd)


def test_qmp_unix_with_options():
    got = endpoints("-m 1G -qmp unix:/tmp/q.sock,server=on,wait=off -S")
    assert [e.address for e in got] == ["/tmp/q.sock"]


def test_relative_path_is_taken_from_qemus_cwd():
    assert endpoints("-qmp unix:q.sock,server,nowait")[0].address == "/run/vm/q.sock"


def test_qmp_tcp_and_pretty():
    got = endpoints("-qmp tcp:127.0.0.1:4444,server=on,wait=off --qmp-pretty tcp::5555,server")
    assert [e.address for e in got] == [("127.0.0.1", 4444), ("localhost", 5555)]


def test_chardev_with_control_monitor():
    got = endpoints(
        "-chardev socket,id=mon0,path=/var/lib/q/mon.sock,server=on,wait=off "
        "-mon chardev=mon0,mode=control "
        "-chardev socket,id=hmp,path=/var/lib/q/hmp.sock,server=on "
        "-mon chardev=hmp,mode=readline"
    )
    assert [e.address for e in got] == ["/var/lib/q/mon.sock"]
    assert got[0].origin == "-chardev id=mon0"


def test_libvirt_fd_passed_monitor_is_listed_but_not_connectable():
    got = endpoints("-chardev socket,id=charmonitor,fd=27,server=on,wait=off "
                    "-mon chardev=charmonitor,id=monitor,mode=control")
    assert got[0].address is None and "libvirt" in str(got[0])


def test_doubled_comma_is_a_literal_comma():
    got = endpoints("-chardev socket,id=m,path=/tmp/a,,b.sock,server=on -mon m,mode=control")
    assert got[0].address == "/tmp/a,b.sock"


def test_order_is_kept_and_other_monitors_ignored():
    got = endpoints("-monitor stdio -qmp unix:/a,server=on -qmp stdio -qmp unix:/b,server=on")
    assert [e.address for e in got] == ["/a", None, "/b"]
