#!/usr/bin/env python3
"""The talk's echo server: one pyzmq REP socket on one thread, replying with what it got.

Used by scripts/compare.sh as the peer the broker is compared with:
    python3 scripts/talk_server.py tcp://127.0.0.1:5556
A DEALER sending [reqid, "", body] gets [reqid, "", body] back (no status frame). SIGTERM or
SIGINT ends it with exit code 0, so a harness can tell a clean stop from a crash.
"""
import signal
import sys

import zmq


def stop(_signum, _frame) -> None:
    raise SystemExit(0)


def main() -> None:
    endpoint = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5556"
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    context = zmq.Context()
    socket = context.socket(zmq.REP)
    socket.setsockopt(zmq.LINGER, 0)  # exit never waits on a client that went away
    socket.bind(endpoint)
    try:
        while True:
            socket.send_multipart(socket.recv_multipart())
    finally:
        socket.close()
        context.term()


if __name__ == "__main__":
    main()
