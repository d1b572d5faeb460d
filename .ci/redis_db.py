"""Claim an empty Redis database number for one run, or release it: other projects may share the server.

``python .ci/redis_db.py claim RUN`` prints the number of a database that was empty and now holds only
this run's claim key; ``python .ci/redis_db.py release N RUN`` empties that database unless another run
has claimed it since.
Needs only the standard library (a minimal RESP client), so it runs before anything is installed.
"""

from __future__ import annotations

import os
import socket
import sys

HOST = os.environ.get("REDIS_HOST", "127.0.0.1")
PORT = int(os.environ.get("REDIS_PORT", "6379"))
KEY = "celery_scheduller:run-claim"


def command(sock: socket.socket, *args: str) -> object:
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    sock.sendall(payload.encode())
    reader = sock.makefile("rb")
    line = reader.readline().decode().rstrip("\r\n")
    kind, rest = line[0], line[1:]
    if kind == "-":
        raise RuntimeError(rest)
    if kind == ":":
        return int(rest)
    if kind == "$":
        return None if rest == "-1" else reader.read(int(rest) + 2)[:-2].decode()
    return rest


def claim(run: str) -> int:
    with socket.create_connection((HOST, PORT), timeout=5) as sock:
        for db in range(15, 0, -1):
            command(sock, "SELECT", str(db))
            if command(sock, "DBSIZE") != 0:
                continue
            if command(sock, "SET", KEY, run, "NX", "EX", "86400") == "OK" and command(sock, "DBSIZE") == 1:
                return db
            if command(sock, "GET", KEY) == run:
                command(sock, "DEL", KEY)
    raise SystemExit("no empty Redis database among 1-15: set CSCHED_BROKER to a broker URL of your choice")


def release(db: int, run: str) -> None:
    with socket.create_connection((HOST, PORT), timeout=5) as sock:
        command(sock, "SELECT", str(db))
        if command(sock, "GET", KEY) in (run, None):  # None: the run emptied it itself (a broker purge)
            command(sock, "FLUSHDB")


if __name__ == "__main__":
    if sys.argv[1] == "claim":
        print(claim(sys.argv[2]))
    else:
        release(int(sys.argv[2]), sys.argv[3])
