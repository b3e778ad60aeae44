#!/usr/bin/env python3
"""Opens N idle DEALER connections to a broker, proves each is up with a health request,
then holds them until stdin closes. Prints "ready N" once all have answered.

    python3 scripts/idle_clients.py tcp://127.0.0.1:5555 10000
"""
import sys

import zmq

HEALTH = b"\x00broker.health"


def main() -> None:
    endpoint, count = sys.argv[1], int(sys.argv[2])
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, count + 16)
    sockets = []
    for _ in range(count):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        s.send(HEALTH)
        sockets.append(s)
    poller = zmq.Poller()
    for s in sockets:
        poller.register(s, zmq.POLLIN)
    answered = 0
    while answered < count:
        events = poller.poll(30_000)
        if not events:
            sys.exit(f"only {answered} of {count} connections answered")
        for s, _ in events:
            s.recv_multipart()
            poller.unregister(s)
            answered += 1
    print(f"ready {count}", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
