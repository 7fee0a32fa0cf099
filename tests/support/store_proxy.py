"""A TCP proxy on the loopback in front of a test's S3 server, which makes the store go away on cue: the
tests' way to cut a bucket off in the middle of an epoch (tests/data/test_bucket.py). A process of its own, as the
server is: DALI's S3 client holds the GIL while it waits.

    python tests/support/store_proxy.py LISTEN_PORT SERVER_PORT LOG

Commands, a line each on standard input:
    down AFTER [SECONDS]   after AFTER more reads of a tar shard by DALI (its client's GET requests), the
                           store goes away: open connections are reset, and new ones are accepted and reset
                           at once, for SECONDS (or until `up`)
    down-when PATH         the store goes away as PATH appears (a run's first checkpoint), until `up`
    up                     the store answers again
LOG holds, as JSON after every change of the first three: reads (DALI's tar GETs forwarded), cut (connections
reset while away), down, and peak (the most DALI requests awaiting their responses at once, over the run).
"""
import json
import os
import re
import socket
import struct
import sys
import threading
import time

SHARD_READ = re.compile(rb"GET /\S+\.tar[ ?]")
DALI = b"user-agent: aws-sdk-cpp/"  # DALI's client, not boto3's (listing, index checks)


class Proxy:
    def __init__(self, listen_port: int, server_port: int, log: str):
        self.server_port, self.log = server_port, log
        self.lock = threading.Lock()
        self.reads, self.cut, self.down, self.down_at, self.back_after = 0, 0, False, None, None
        self.waiting: set[socket.socket] = set()  # connections whose DALI request awaits its response
        self.peak = 0  # the most DALI requests in flight at once
        self.open: set[socket.socket] = set()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", listen_port))
        self.listener.listen(64)
        self.write()

    def write(self) -> None:
        with open(self.log + ".tmp", "w") as f:
            json.dump({"reads": self.reads, "cut": self.cut, "down": self.down, "peak": self.peak}, f)
        os.replace(self.log + ".tmp", self.log)

    def serve(self) -> None:
        while True:
            client, _ = self.listener.accept()
            with self.lock:
                if self.down:
                    self.reset(client)
                    self.cut += 1
                    self.write()
                    continue
                try:
                    server = socket.create_connection(("127.0.0.1", self.server_port))
                except OSError:  # the server is not up yet
                    self.reset(client)
                    continue
                self.open |= {client, server}
            threading.Thread(target=self.pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(server, client, False), daemon=True).start()

    @staticmethod
    def reset(sock: socket.socket) -> None:
        """Close with a reset (RST), as a store that went away mid-request does."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        except OSError:
            pass

    def pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dali = requests and DALI in data.lower()
                reads = len(SHARD_READ.findall(data)) if dali else 0
                with self.lock:  # HTTP/1.1 on one connection: a request, then its response
                    if dali:
                        self.waiting.add(src)
                        self.peak = max(self.peak, len(self.waiting))
                    elif not requests:
                        self.waiting.discard(dst)
                if reads:
                    with self.lock:
                        if self.down_at is not None and self.reads + reads > self.down_at:
                            self.go_down()
                            return
                        self.reads += reads
                        self.write()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                for sock in (src, dst):
                    self.open.discard(sock)
                    self.waiting.discard(sock)
                    self.reset(sock)

    def go_down(self) -> None:
        """(lock held) Every open connection reset, later ones reset as they come, for back_after seconds."""
        self.down, self.down_at = True, None
        for sock in list(self.open):
            self.reset(sock)
        self.open.clear()
        self.write()
        if self.back_after is not None:
            threading.Timer(self.back_after, self.up).start()

    def up(self) -> None:
        with self.lock:
            self.down = False
            self.write()

    def command(self, line: str) -> None:
        word, *args = line.split()
        if word == "down":
            with self.lock:
                self.down_at = self.reads + int(args[0])
                self.back_after = float(args[1]) if len(args) > 1 else None
                if self.down_at <= self.reads:
                    self.go_down()
        elif word == "down-when":
            threading.Thread(target=self.down_when, args=(args[0],), daemon=True).start()
        elif word == "up":
            self.up()

    def down_when(self, path: str) -> None:
        while not os.path.exists(path):
            time.sleep(0.005)
        with self.lock:
            self.back_after = None
            self.go_down()


def main() -> None:
    listen_port, server_port, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    proxy = Proxy(listen_port, server_port, log)
    threading.Thread(target=proxy.serve, daemon=True).start()
    for line in sys.stdin:
        if line.strip():
            proxy.command(line)


if __name__ == "__main__":
    main()
