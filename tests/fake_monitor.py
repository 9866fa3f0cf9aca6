"""A QMP monitor that answers as a script says, for tests of what livedump does
with replies no QEMU would send.

Run by a copy of the Python interpreter named ``qemu-system-x86_64`` (see
tests/test_monitor_replies.py), it is a QEMU to livedump in every check
that livedump makes of the process: its name, and the peer of its socket.
Left to itself it answers as QEMU would for a guest of 1 MiB of RAM,
which it holds in its own memory; ``SCRIPT`` (JSON) overrides:

    {"greeting": TEXT, "replies": {KEY: REPLY}, "pretty": BOOL}

KEY is a QMP command, or ``hmp:`` and an HMP command line; REPLY a JSON
object (given the request's id), or ``{"raw": TEXT}`` sent as it is. With
``pretty``, the greeting and replies are pretty-printed as QEMU's
``-qmp-pretty`` does. Every message received is logged to ``LOG``, one
JSON per line.

    qemu-system-x86_64 fake_monitor.py SOCKET LOG SCRIPT
"""

import contextlib
import ctypes
import json
import mmap
import socket
import sys

RAM_SIZE = 1 << 20
GREETING = json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                           "package": ""}, "capabilities": []}})


def main() -> None:
    path, log_path, script_path = sys.argv[1:4]
    with open(script_path) as f:
        script = json.load(f)
    ram = mmap.mmap(-1, RAM_SIZE)
    ram[:] = bytes(range(256)) * (RAM_SIZE // 256)
    address = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    state = {"running": True}
    defaults = {
        "qmp_capabilities": {"return": {}},
        "query-target": {"return": {"arch": "x86_64"}},
        "query-memory-devices": {"return": []},
        "hmp:info mtree -f": {"return": (
            'FlatView #0\r\n AS "memory", root: system\r\n Root memory region: system\r\n'
            f"  0000000000000000-{RAM_SIZE - 1:016x} (prio 0, ram): pc.ram\r\n\r\n")},
        "hmp:gpa2hva 0x0": {"return": f"Host virtual address for 0x0 (pc.ram) is "
                                      f"{address:#x}\r\n"},
        "hmp:info ramblock": {"return": (
            "              Block Name    PSize              Offset               Used"
            "              Total\r\n"
            f"                  pc.ram    4 KiB  0x0000000000000000 0x{RAM_SIZE:016x} "
            f"0x{RAM_SIZE:016x}\r\n")},
    }
    replies = {**defaults, **script.get("replies", {})}
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    with open(log_path, "a") as log:
        while True:
            client, _ = server.accept()
            with client, contextlib.suppress(ConnectionError):
                # A client that hangs up mid-reply (as livedump does on a reply it
                # will not read to its end) leaves QEMU running, and so this.
                pretty = bool(script.get("pretty"))
                greeting = script.get("greeting", encode(json.loads(GREETING), pretty))
                serve(client, greeting, replies, state, log, pretty)


def encode(message: dict, pretty: bool) -> str:
    """``message`` as QEMU sends it: one line, or pretty-printed over several."""
    if not pretty:
        return json.dumps(message)
    return json.dumps(message, indent=4).replace("\n", "\r\n")


def serve(client: socket.socket, greeting: str, replies: dict, state: dict, log,
          pretty: bool = False) -> None:
    client.sendall(greeting.encode() + b"\r\n")
    decoder = json.JSONDecoder()
    buf = ""
    while data := client.recv(65536):
        buf += data.decode()
        while buf.strip():
            buf = buf.lstrip()
            try:
                request, end = decoder.raw_decode(buf)
            except ValueError:
                break
            buf = buf[end:]
            log.write(json.dumps(request) + "\n")
            log.flush()
            client.sendall(answer(request, replies, state, pretty).encode() + b"\r\n")


def answer(request: dict, replies: dict, state: dict, pretty: bool = False) -> str:
    command = request.get("execute")
    if command == "human-monitor-command":
        key = "hmp:" + request["arguments"]["command-line"]
    else:
        key = command
    if command in ("stop", "cont"):
        state["running"] = command == "cont"
    reply = replies.get(key)
    if reply is None and command == "query-status":
        reply = {"return": {"status": "running" if state["running"] else "paused",
                            "running": state["running"]}}
    elif reply is None and command in ("stop", "cont"):
        reply = {"return": {}}
    elif reply is None:
        reply = {"error": {"class": "CommandNotFound", "desc": f"no {key} here"}}
    if "raw" in reply:
        return reply["raw"]
    return encode({**reply, **({"id": request["id"]} if "id" in request else {})}, pretty)


if __name__ == "__main__":
    main()
