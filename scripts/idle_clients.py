#!/usr/bin/env python3
"""Opens N idle DEALER connections to a broker in batches, proves each is up with a health
request, then holds them until stdin closes. Prints "ready N" once all have answered.

    python3 scripts/idle_clients.py tcp://127.0.0.1:5555 10000
"""
import sys

import zmq

HEALTH = b"\x00broker.health"
BATCH = 500  # a burst far beyond the listen backlog only measures SYN retransmits


def main() -> None:
    endpoint, count = sys.argv[1], int(sys.argv[2])
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, count + 16)
    sockets = []
    while len(sockets) < count:
        batch = []
        for _ in range(min(BATCH, count - len(sockets))):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            s.send(HEALTH)
            batch.append(s)
        poller = zmq.Poller()
        for s in batch:
            poller.register(s, zmq.POLLIN)
        waiting = len(batch)
        while waiting:
            events = poller.poll(60_000)
            if not events:
                sys.exit(f"only {len(sockets) + len(batch) - waiting} of {count} connections answered")
            for s, _ in events:
                s.recv_multipart()
                poller.unregister(s)
                waiting -= 1
        sockets.extend(batch)
    print(f"ready {count}", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
