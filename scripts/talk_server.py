#!/usr/bin/env python3
"""The talk's echo server: one pyzmq REP socket on one thread, replying with what it got.

Used by scripts/compare.sh as the peer the broker is compared with:
    python3 scripts/talk_server.py tcp://127.0.0.1:5556
"""
import sys

import zmq


def main() -> None:
    endpoint = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5556"
    socket = zmq.Context().socket(zmq.REP)
    socket.bind(endpoint)
    while True:
        socket.send_multipart(socket.recv_multipart())


if __name__ == "__main__":
    main()
