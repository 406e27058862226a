#!/usr/bin/env python3
"""Every hostile-peer attack of tests/hostile.rs at once, against one server, for a bounded
time (used by scripts/soak.sh; standard library only).

  scripts/attackers.py HOST:PORT SECONDS

Each attack runs in its own threads and reconnects whenever the server closes it, so the
pressure lasts the whole run: ping and echo floods that never read, announced-huge frames
with a byte of payload, slowloris after the upgrade, a pong flood, peers that never read
and then close, handshakes left hanging, POSTs with bodies that are never read, HEAD
requests. At the end it prints one JSON line of counts (connections made, bytes pushed,
answers seen) and exits 0; it never judges the server (soak.sh does).
"""

import base64
import json
import os
import socket
import struct
import sys
import threading
import time

HOST, PORT = sys.argv[1].rsplit(":", 1)
PORT = int(PORT)
DEADLINE = time.monotonic() + float(sys.argv[2])
KEY = base64.b64encode(os.urandom(16)).decode()
COUNTS = {}
LOCK = threading.Lock()


def count(name, n=1):
    with LOCK:
        COUNTS[name] = COUNTS.get(name, 0) + n


def running():
    return time.monotonic() < DEADLINE


def frame(opcode, payload, fin=True, announce=None):
    """A masked client frame; `announce` overrides the length in the header."""
    length = len(payload) if announce is None else announce
    head = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", length)
    mask = os.urandom(4)
    body = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return head + mask + body


def connect(rcvbuf=None, timeout=5.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect((HOST, PORT))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def upgrade(path="/echo", rcvbuf=None):
    s = connect(rcvbuf)
    s.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("closed during the upgrade")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
    count("upgrades")
    return s


def forever(name, attack):
    """Runs `attack` again and again until the deadline; errors mean the server closed us."""
    while running():
        try:
            attack()
        except (OSError, ConnectionError):
            count(name + "_closed_by_server")
            time.sleep(0.05)


def flood(s, data, pause=0.0):
    """Writes `data` until the deadline or the server stops reading for 2 s."""
    s.settimeout(2.0)
    while running():
        try:
            s.sendall(data)
        except socket.timeout:
            count("flood_blocked")
            time.sleep(0.2)
            continue
        if pause:
            time.sleep(pause)


def ping_flood():
    s = upgrade(rcvbuf=4096)
    flood(s, frame(0x9, b"\x55" * 125) * 256)
    s.close()


def echo_flood():
    s = upgrade(rcvbuf=4096)
    flood(s, frame(0x2, b"\x07" * 16384) * 4)
    s.close()


def pong_flood():
    s = upgrade()
    reader = threading.Thread(target=drain, args=(s,), daemon=True)
    reader.start()
    flood(s, frame(0xA, b"") * 8192)
    s.close()


def drain(s):
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass


def announced_huge():
    socks = []
    try:
        for _ in range(100):
            s = upgrade()
            s.sendall(frame(0x2, b"\x00", announce=16 << 20)[: 14 + 1])
            socks.append(s)
        # Held until the message timeout closes them (the server's answer: 1008).
        for s in socks:
            s.settimeout(30)
            while s.recv(4096):
                count("announced_answers")
    finally:
        for s in socks:
            s.close()


def slowloris():
    s = upgrade()
    s.sendall(frame(0x2, b"", announce=1 << 20)[:14])
    while running():
        s.sendall(b"\x00")
        time.sleep(0.5)


def never_read_then_close():
    s = upgrade(rcvbuf=4096)
    s.settimeout(1.0)
    try:
        for _ in range(256):
            s.sendall(frame(0x2, b"\x03" * 65536))
    except socket.timeout:
        pass
    s.sendall(frame(0x8, struct.pack(">H", 1000)))
    s.settimeout(30)
    # The server drops us within its close timeout; reading now only sees the end.
    while s.recv(65536):
        pass
    count("stuck_closers_dropped")
    s.close()


def hanging_handshakes():
    socks = []
    try:
        for _ in range(50):
            s = connect()
            s.sendall(b"GET /echo HTTP/1.1\r\n")
            socks.append(s)
        for s in socks:
            s.settimeout(30)
            while s.recv(4096):
                pass
        count("hangers_dropped", len(socks))
    finally:
        for s in socks:
            s.close()


def unread_bodies():
    s = connect()
    body = b"x" * (512 * 1024)
    req = f"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    sender = threading.Thread(target=lambda: _send_quietly(s, req + body), daemon=True)
    sender.start()
    answer = b""
    s.settimeout(10)
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        answer += chunk
    count("post_answers_405" if answer.startswith(b"HTTP/1.1 405") else "post_answers_lost")
    s.close()


def _send_quietly(s, data):
    try:
        s.sendall(data)
    except OSError:
        pass


def head_requests():
    s = connect()
    s.sendall(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    s.settimeout(10)
    answer = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        answer += chunk
    ok = answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n")
    count("head_ok" if ok else "head_bad")
    s.close()
    time.sleep(0.1)


ATTACKS = [
    ("ping_flood", ping_flood, 2),
    ("echo_flood", echo_flood, 2),
    ("pong_flood", pong_flood, 1),
    ("announced_huge", announced_huge, 1),
    ("slowloris", slowloris, 4),
    ("never_read_then_close", never_read_then_close, 4),
    ("hanging_handshakes", hanging_handshakes, 1),
    ("unread_bodies", unread_bodies, 2),
    ("head_requests", head_requests, 1),
]

threads = []
for name, attack, n in ATTACKS:
    for _ in range(n):
        t = threading.Thread(target=forever, args=(name, attack), daemon=True)
        t.start()
        threads.append(t)
while running():
    time.sleep(0.5)
time.sleep(1)
print(json.dumps(dict(sorted(COUNTS.items()))))
sys.stdout.flush()
os._exit(0)
