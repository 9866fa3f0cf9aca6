"""Finding QMP monitors on QEMU command lines as users and libvirt write them."""

import os

from livedump.vm.process import QmpEndpoint, parse_qmp_options


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


# A config file as QEMU 7.2's -writeconfig writes one, with a QMP monitor in it.
CONFIG = '''# qemu config file

[chardev "qmp0"]
  backend = "socket"
  path = "qmp.sock"
  server = "on"
  wait = "off"

[mon]
  mode = "control"
  chardev = "qmp0"

[chardev "hmp0"]
  backend = "socket"
  path = "/run/vm/hmp.sock"
  server = "on"

[mon "hmp"]
  mode = "readline"
  chardev = "hmp0"

[chardev "qmp1"]
  backend = "socket"
  host = "127.0.0.1"
  port = "4444"
  server = "on"
'''


def test_readconfig_monitors_with_paths_as_qemu_takes_them(tmp_path):
    """The file's path, and the socket's in it, are both taken from QEMU's cwd."""
    (tmp_path / "vm.cfg").write_text(CONFIG)
    got = endpoints("-readconfig vm.cfg", cwd=str(tmp_path))
    assert [(e.address, e.origin) for e in got] == [
        (f"{tmp_path}/qmp.sock", '[chardev "qmp0"] of vm.cfg')]


def test_readconfig_and_command_line_join_in_order(tmp_path):
    (tmp_path / "vm.cfg").write_text(CONFIG)
    got = endpoints(f"-qmp unix:/a,server=on -readconfig {tmp_path}/vm.cfg "
                    "-mon chardev=qmp1,mode=control -chardev backend=socket,id=c,path=/c "
                    "-mon c,mode=control")
    assert [e.address for e in got] == ["/a", "/run/vm/qmp.sock", ("127.0.0.1", 4444), "/c"]


def test_an_unreadable_readconfig_is_listed_with_why(tmp_path):
    got = endpoints(f"-readconfig {tmp_path}/gone.cfg -qmp unix:/a,server=on")
    assert [e.address for e in got] == [None, "/a"]
    assert str(got[0]) == f"-readconfig {tmp_path}/gone.cfg (cannot read it: No such file " \
                          "or directory)"


def test_a_readconfig_pipe_is_not_waited_on(tmp_path):
    """QEMU read it once (``-readconfig <(...)``); opening it again would wait for a writer."""
    os.mkfifo(tmp_path / "fifo.cfg")
    got = endpoints("-readconfig fifo.cfg", cwd=str(tmp_path))
    assert str(got[0]) == "-readconfig fifo.cfg (cannot read it: not a regular file; QEMU " \
                          "read it once)"
