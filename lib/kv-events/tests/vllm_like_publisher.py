"""A stand-in for vLLM's KV event publisher and for a pyzmq consumer of one.

Speaks only vLLM's documented wire format: a PUB socket sending
[topic, seq (u64 big-endian), msgpack batch], and a ROUTER for replay that
answers ["", start_seq] with ["", seq, payload] for every buffered batch from
start_seq on, then ["", -1, b""]. Batches are in the array form of released
vLLM versions. The Rust tests in kv_events.rs start it; nothing else should.

    python vllm_like_publisher.py publish
        Binds PUB and ROUTER on loopback, publishes HISTORY (before anyone
        can be listening), prints {"endpoint", "replay_endpoint"} as one JSON
        line, then publishes a heartbeat batch every 50 ms. Every fifth live
        batch is buffered but not sent, so a subscriber must replay it.
        Serves replay until stdin closes (or 30 s pass).

    python vllm_like_publisher.py subscribe ENDPOINT REPLAY_ENDPOINT
        Reads one live message with a SUB socket, asks a replay from 0 with a
        DEALER, prints {"topic", "first_live", "replay": [[seq, batch], ...]}
        as one JSON line and exits; exits 1 after 10 s without an answer.
"""

import json
import sys
import time

import msgpack
import zmq

TOPIC = b"kv-events"
END_SEQ = (-1).to_bytes(8, "big", signed=True)
DP_RANK = 0


def stored(hashes, parent, first_token, block_size=16):
    tokens = list(range(first_token, first_token + block_size * len(hashes)))
    return ["BlockStored", hashes, parent, tokens, block_size, None, None, None, None]


HISTORY = [
    [stored([101, 102], None, 0)],
    [stored([103], 102, 32)],
    [["BlockRemoved", [103], None]],
    [["AllBlocksCleared"]],
    [stored([201, 202, 203], None, 100)],
]
# Every fifth live batch (seq 7, 12, ...) is kept for replay but not sent on
# PUB; each stores block 204 again, so the index ends the same however many
# a subscriber sees.
GAP_EVENTS = [stored([204], 203, 148)]


def batch(events):
    return msgpack.packb([time.time(), events, DP_RANK])


def publish():
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind("tcp://127.0.0.1:*")
    router = ctx.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:*")
    endpoints = {
        "endpoint": pub.getsockopt_string(zmq.LAST_ENDPOINT),
        "replay_endpoint": router.getsockopt_string(zmq.LAST_ENDPOINT),
    }
    buffer = []

    def send(events, live=True):
        seq = len(buffer)
        payload = batch(events)
        buffer.append((seq, payload))
        if live:
            pub.send_multipart([TOPIC, seq.to_bytes(8, "big"), payload])

    # Before anyone knows where to listen: a subscriber must replay these.
    for events in HISTORY:
        send(events)
    print(json.dumps(endpoints), flush=True)

    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    deadline = time.monotonic() + 30
    next_beat = time.monotonic()
    while time.monotonic() < deadline:
        if time.monotonic() >= next_beat:
            if len(buffer) % 5 == 2:
                send(GAP_EVENTS, live=False)
            send([])
            next_beat += 0.05
        ready = dict(poller.poll(timeout=20))
        if ready.get(router):
            client, _, start = router.recv_multipart()
            start = int.from_bytes(start, "big")
            for seq, payload in buffer:
                if seq >= start:
                    router.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
            router.send_multipart([client, b"", END_SEQ, b""])
        if ready.get(sys.stdin.fileno()) and not sys.stdin.readline():
            break
    ctx.destroy(linger=0)


def subscribe(endpoint, replay_endpoint):
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    if not sub.poll(10_000):
        sys.exit("no live message within 10 s")
    topic, seq, _payload = sub.recv_multipart()
    first_live = int.from_bytes(seq, "big")

    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(replay_endpoint)
    dealer.send_multipart([b"", (0).to_bytes(8, "big")])
    replay = []
    while True:
        if not dealer.poll(10_000):
            sys.exit("replay did not end within 10 s")
        _, seq, payload = dealer.recv_multipart()
        if seq == END_SEQ:
            assert payload == b"", "the terminator's payload must be empty"
            break
        replay.append([int.from_bytes(seq, "big"), msgpack.unpackb(payload)])
    print(json.dumps({"topic": topic.decode(), "first_live": first_live, "replay": replay}), flush=True)
    ctx.destroy(linger=0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["publish"]:
        publish()
    elif sys.argv[1:2] == ["subscribe"] and len(sys.argv) == 4:
        subscribe(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
