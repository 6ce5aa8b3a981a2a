"""events: how fast a chunk's event reaches its watchers, and what an idle watcher costs.

Latency (issue 7): one recorder uploads CHUNKS chunks of 64 KiB to one fileId, one every
PACE_S, while S subscribers (1 and 200) watch that fileId over WebSocket, then over SSE. For
every chunk and every subscriber: (time the event arrived at the subscriber) minus (time the
chunk's 200 arrived at the recorder). It can be negative: the server publishes the event when
the chunk is durable, just before it writes the 200. Also shown: the event measured from the
first byte of the chunk's request, and the chunk's round trip with 0 and with S subscribers
(uploads must not notice the watchers). p50/p99 are nearest-rank over every (chunk,
subscriber) pair.

The subscribers are raw sockets read by one selector thread of this process: an arrival is
time-stamped when recv() returns, before any parsing. With 200 subscribers that thread works
through 200 sockets per event, so the last of them is stamped later than the first: that is
in the figure, as it would be for 200 real clients sharing 2 cores with the server.

Idle RSS per subscriber: a fresh server's VmRSS, then VmRSS with 200 idle subscribers (each has
read its first `state` event), difference / 200; once for WebSocket, once for SSE (a fresh
server each).

Run alone: python bench/bench_events.py [--quick] [--python PATH]. run.py does not list it (it
is the lead's file); it has the same NAME/run(ctx) interface as the others, to be added there.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import socket
import sys
import time

import common as c
from common import format_ms as ms, percentile_or_none as pct

NAME = "events"
CHUNK_BYTES = 64 * c.KIB
PACE_S = 0.02
FULL_CHUNKS = 200
QUICK_CHUNKS = 40
SUBSCRIBER_COUNTS = (1, 200)
IDLE_SUBSCRIBERS = 200
SETTLE_S = 0.5
DEADLINE_S = 60.0
SERVER_ARGS = ["--max-subscribers", "250", "--max-connections", "400",
               "--event-heartbeat", "300"]
CHUNK_INDEX = re.compile(rb'"type":"chunk".*?"index":(\d+)')


def run(ctx):
    chunks = QUICK_CHUNKS if ctx.quick else FULL_CHUNKS
    pool = c.random_pool(4 * c.MIB)
    figures, rows, notes = {"latency": {}, "idle_rss_kib_per_subscriber": {}}, [], []
    for transport in ("websocket", "sse"):
        for count in SUBSCRIBER_COUNTS:
            result = measure_latency(ctx, transport, count, chunks, pool)
            figures["latency"]["%s_%d" % (transport, count)] = result
            ctx.log("events %s x%d: 200->event p50 %.2f p99 %.2f ms; chunk round trip p50 "
                    "%.2f ms (%.2f ms unwatched)" % (transport, count, result["p50_ms"],
                                                     result["p99_ms"], result["rtt_p50_ms"],
                                                     result["rtt_unwatched_p50_ms"]))
            rows.append(["%s, %d subscriber%s: 200 -> event" % (transport, count,
                                                                 "s" if count > 1 else ""),
                         "p50 %s  p99 %s" % (ms(result["p50_ms"]), ms(result["p99_ms"])),
                         "request sent -> event: p50 %s p99 %s; %d events"
                         % (ms(result["from_send_p50_ms"]), ms(result["from_send_p99_ms"]),
                            result["events"])])
            rows.append(["%s, %d subscriber%s: chunk round trip" % (
                transport, count, "s" if count > 1 else ""),
                "p50 %s  p99 %s" % (ms(result["rtt_p50_ms"]), ms(result["rtt_p99_ms"])),
                "unwatched upload, same server: p50 %s p99 %s"
                % (ms(result["rtt_unwatched_p50_ms"]), ms(result["rtt_unwatched_p99_ms"]))])
            if result["lost"]:
                notes.append("%s x%d: %d events never arrived" % (transport, count,
                                                                 result["lost"]))
    for transport in ("websocket", "sse"):
        per = idle_rss(ctx, transport)
        figures["idle_rss_kib_per_subscriber"][transport] = per
        ctx.log("events idle RSS per %s subscriber: %.1f KiB" % (transport, per))
        rows.append(["idle RSS per %s subscriber" % transport, "%.1f KiB" % per,
                     "%d idle subscribers on a fresh server" % IDLE_SUBSCRIBERS])
    return {"title": "events: chunk 200 -> event latency, idle subscriber RSS",
            "figures": figures, "rows": rows, "targets": [], "notes": notes}


# --------------------------------------------------------------------------------------------
# Latency

def measure_latency(ctx, transport, count, chunks, pool):
    with c.Workspace(NAME) as ws:
        server = c.ServerProcess("m1server", ws.sub("srv"), ctx.python,
                                 extra_args=SERVER_ARGS).start()
        try:
            unwatched = upload(server, "bench_unwatched", chunks, pool)
            subscribers = Subscribers(server, transport, "bench_watched", count)
            try:
                watched = upload(server, "bench_watched", chunks, pool)
                arrivals = subscribers.wait_for(chunks)
            finally:
                subscribers.close()
        finally:
            server.stop()
    from_200, from_send, lost = [], [], 0
    for conn_arrivals in arrivals:
        for index, (sent, acked) in enumerate(watched):
            arrived = conn_arrivals.get(index)
            if arrived is None:
                lost += 1
                continue
            from_200.append((arrived - acked) * 1000.0)
            from_send.append((arrived - sent) * 1000.0)
    rtt = [(acked - sent) * 1000.0 for sent, acked in watched]
    rtt_unwatched = [(acked - sent) * 1000.0 for sent, acked in unwatched]
    return {"subscribers": count, "chunks": chunks, "events": len(from_200), "lost": lost,
            "p50_ms": pct(from_200, 0.5), "p99_ms": pct(from_200, 0.99),
            "min_ms": min(from_200) if from_200 else None,
            "max_ms": max(from_200) if from_200 else None,
            "from_send_p50_ms": pct(from_send, 0.5), "from_send_p99_ms": pct(from_send, 0.99),
            "rtt_p50_ms": pct(rtt, 0.5), "rtt_p99_ms": pct(rtt, 0.99),
            "rtt_unwatched_p50_ms": pct(rtt_unwatched, 0.5),
            "rtt_unwatched_p99_ms": pct(rtt_unwatched, 0.99)}


def upload(server, file_id, chunks, pool):
    """Send the chunks one by one, paced; returns (request sent, 200 received) per chunk."""
    requests = c.recording_requests(server.host, server.port, file_id, pool, chunks,
                                    CHUNK_BYTES)
    times = []
    with c.Connection(server.host, server.port) as conn:
        for data in requests:
            sent = time.perf_counter()
            response = conn.request(data)
            acked = time.perf_counter()
            if response.status != 200:
                raise c.BenchError("chunk refused: %d %r" % (response.status,
                                                             response.body[:200]))
            times.append((sent, acked))
            time.sleep(PACE_S)
    return times


class Subscribers:
    """`count` raw subscribers of one fileId, read by one selector thread."""

    def __init__(self, server, transport, file_id, count):
        self.transport = transport
        self.arrivals = [dict() for _ in range(count)]
        self.buffers = [b""] * count
        socks = []
        for n in range(count):
            sock = open_stream(server, transport, file_id)
            socks.append(sock)
            self.buffers[n] = read_first_event(sock, transport)
        self.reader = c.SocketReader(socks, self.on_data)

    def on_data(self, n, data, now):
        self.buffers[n] = self.consume(n, self.buffers[n] + data, now)

    def consume(self, n, buffer, now):
        """Record the chunk events complete in `buffer`; return the unparsed rest."""
        if self.transport == "sse":
            *blocks, rest = buffer.split(b"\n\n")
            for block in blocks:
                found = CHUNK_INDEX.search(block)
                if found:
                    self.arrivals[n].setdefault(int(found.group(1)), now)
            return rest
        while len(buffer) >= 2:
            size, offset = buffer[1] & 0x7F, 2
            if size == 126:
                if len(buffer) < 4:
                    break
                size, offset = int.from_bytes(buffer[2:4], "big"), 4
            elif size == 127:
                if len(buffer) < 10:
                    break
                size, offset = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < offset + size:
                break
            found = CHUNK_INDEX.search(buffer[offset:offset + size])
            if found:
                self.arrivals[n].setdefault(int(found.group(1)), now)
            buffer = buffer[offset + size:]
        return buffer

    def wait_for(self, chunks):
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if all(len(a) >= chunks for a in self.arrivals):
                break
            time.sleep(0.05)
        return [dict(a) for a in self.arrivals]

    def close(self):
        self.reader.close()


def open_stream(server, transport, file_id):
    sock = socket.create_connection((server.host, server.port), timeout=c.SOCKET_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = ["GET /api/video/events/%s HTTP/1.1" % file_id,
            "Host: %s:%d" % (server.host, server.port)]
    if transport == "websocket":
        head += ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                 "Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode()]
    else:
        head += ["Accept: text/event-stream"]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("ascii"))
    return sock


def read_first_event(sock, transport):
    """Read the answer's head and the first event (the state); return what came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise c.BenchError("event stream closed before its head")
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    expected = b" 101 " if transport == "websocket" else b" 200 "
    if expected not in head.split(b"\r\n", 1)[0]:
        raise c.BenchError("event stream refused: %r" % head[:200])
    while True:
        end = first_event_end(rest, transport)
        if end is not None:
            return rest[end:]
        more = sock.recv(65536)
        if not more:
            raise c.BenchError("event stream closed before its state")
        rest += more


def first_event_end(data, transport):
    """Where the first event (SSE block or WebSocket frame) ends in `data`, or None."""
    if transport == "sse":
        found = data.find(b'"type":"state"')
        end = data.find(b"\n\n", found) if found >= 0 else -1
        return None if end < 0 else end + 2
    if len(data) < 2:
        return None
    size, offset = data[1] & 0x7F, 2
    if size == 126:
        if len(data) < 4:
            return None
        size, offset = int.from_bytes(data[2:4], "big"), 4
    elif size == 127:
        if len(data) < 10:
            return None
        size, offset = int.from_bytes(data[2:10], "big"), 10
    return offset + size if len(data) >= offset + size else None


# --------------------------------------------------------------------------------------------
# Idle RSS

def idle_rss(ctx, transport):
    with c.Workspace(NAME) as ws:
        server = c.ServerProcess("m1server", ws.sub("srv"), ctx.python,
                                 extra_args=SERVER_ARGS).start()
        socks = []
        try:
            probe = open_stream(server, transport, "bench_idle_probe")   # first-use imports
            read_first_event(probe, transport)
            probe.close()
            time.sleep(SETTLE_S)
            before = c.rss_kib(server.pid)
            for n in range(IDLE_SUBSCRIBERS):
                sock = open_stream(server, transport, "bench_idle_%d" % (n % 10))
                read_first_event(sock, transport)
                socks.append(sock)
            time.sleep(SETTLE_S)
            after = c.rss_kib(server.pid)
        finally:
            for sock in socks:
                sock.close()
            server.stop()
    if before is None or after is None:
        raise c.BenchError("no RSS reading on this platform")
    return (after - before) / float(IDLE_SUBSCRIBERS)


# --------------------------------------------------------------------------------------------

class _Context:
    def __init__(self, quick, python):
        self.quick = quick
        self.python = python

    def log(self, message):
        sys.stderr.write("  .. %s\n" % message)
        sys.stderr.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description="m1server event latency and idle RSS")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--python", default=None)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    outcome = run(_Context(args.quick, args.python or c.base_python()))
    print(outcome["title"])
    width = max(len(r[0]) for r in outcome["rows"])
    for label, value, detail in outcome["rows"]:
        print("  %-*s  %-22s %s" % (width, label, value, detail))
    for note in outcome["notes"]:
        print("  note: %s" % note)
    if args.json:
        print(json.dumps(outcome["figures"], indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
