"""Redis through redis-py on 127.0.0.1:6379 (only ever this address), two ways:

- ``redis-list``: the reliable-queue pattern. LPUSH to publish; LMOVE (BLMOVE to wait) from
  the queue to this consumer's processing list to claim; LREM from the processing list to ack.
- ``redis-stream``: a Stream with a consumer group. XADD to publish; XREADGROUP (with BLOCK to
  wait) to claim; XACK to ack.

Every key lives under a fresh ``sqlbus-bench:<random>:`` prefix, deleted at teardown; the
server's own settings are left alone and reported.
"""

from __future__ import annotations

import os
import secrets

from . import Client, Peer, Unavailable, decode, encode, payload

HOST, PORT = "127.0.0.1", 6379
GROUP = "bench"


def _redis():
    import redis

    return redis.Redis(host=HOST, port=PORT, socket_connect_timeout=1.0)


class RedisListClient(Client):
    blocking = True  # BLMOVE

    def __init__(self, prefix: str) -> None:
        self.r = _redis()
        self.prefix = prefix
        self.processing = f"{prefix}processing:{os.getpid()}:{secrets.token_hex(3)}"

    def put(self, queue: str, i: int) -> None:
        self.r.lpush(self.prefix + queue, encode(payload(i)))

    def put_many(self, queue: str, ids: list[int]) -> None:
        self.r.lpush(self.prefix + queue, *[encode(payload(i)) for i in ids])

    def _ack(self, value: bytes | None) -> int | None:
        if value is None:
            return None
        self.r.lrem(self.processing, 1, value)
        return decode(value)["i"]

    def get_nowait(self, queue: str) -> int | None:
        return self._ack(self.r.lmove(self.prefix + queue, self.processing, "RIGHT", "LEFT"))

    def get_blocking(self, queue: str, timeout: float) -> int | None:
        return self._ack(
            self.r.blmove(self.prefix + queue, self.processing, timeout, "RIGHT", "LEFT")
        )

    def close(self) -> None:
        self.r.close()


class RedisStreamClient(Client):
    blocking = True  # XREADGROUP BLOCK

    def __init__(self, prefix: str) -> None:
        self.r = _redis()
        self.prefix = prefix
        self.consumer = f"c-{os.getpid()}-{secrets.token_hex(3)}"

    def put(self, queue: str, i: int) -> None:
        self.r.xadd(self.prefix + queue, {"d": encode(payload(i))})

    def put_many(self, queue: str, ids: list[int]) -> None:
        pipe = self.r.pipeline(transaction=False)
        key = self.prefix + queue
        for i in ids:
            pipe.xadd(key, {"d": encode(payload(i))})
        pipe.execute()

    def _read(self, queue: str, block_ms: int | None) -> int | None:
        key = self.prefix + queue
        reply = self.r.xreadgroup(GROUP, self.consumer, {key: ">"}, count=1, block=block_ms)
        if not reply:
            return None
        entries = reply[0][1]
        if not entries:
            return None
        entry_id, fields = entries[0]
        self.r.xack(key, GROUP, entry_id)
        return decode(fields[b"d"])["i"]

    def get_nowait(self, queue: str) -> int | None:
        return self._read(queue, None)

    def get_blocking(self, queue: str, timeout: float) -> int | None:
        return self._read(queue, max(1, int(timeout * 1000)))

    def close(self) -> None:
        self.r.close()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _RedisPeer(Peer):
    package = "redis"
    has_batch = True

    def check(self) -> None:
        try:
            import redis
        except ImportError as exc:
            raise Unavailable("redis-py is not installed (pip install redis)") from exc
        try:
            _redis().ping()
        except redis.RedisError as exc:
            raise Unavailable(f"no Redis server answers on {HOST}:{PORT} ({exc}); skipped") from exc

    def version(self) -> str:
        try:
            server = _redis().info("server")["redis_version"]
        except Exception:  # noqa: BLE001 - the version line must not fail the report
            server = "?"
        return f"redis-py {super().version()}, server {server}"

    def settings(self, store: str) -> str:
        r = _redis()
        config = {}
        for name in ("appendonly", "appendfsync", "save"):
            try:
                config.update({k if isinstance(k, str) else k.decode(): v
                               for k, v in r.config_get(name).items()})
            except Exception:  # noqa: BLE001 - CONFIG may be disabled on a server
                pass
        shown = ", ".join(f"{k}={_text(v)!r}" for k, v in config.items())
        return f"server config: {shown or 'unreadable'} (left as found)"

    def setup(self, workdir: str, queues: tuple[str, ...]) -> str:
        return f"sqlbus-bench:{secrets.token_hex(6)}:"

    def teardown(self, store: str) -> None:
        r = _redis()
        keys = list(r.scan_iter(match=store + "*", count=1000))
        for start in range(0, len(keys), 1000):
            r.delete(*keys[start : start + 1000])
        r.close()


class RedisListPeer(_RedisPeer):
    name = "redis-list"
    label = "Redis list (LMOVE)"
    batch_note = "one variadic LPUSH of 100 values"
    caveats = (
        "in memory; durability is whatever the server is configured with (see settings)",
        "reliable-queue pattern: a per-consumer processing list; LREM acks by value",
    )

    def open(self, store: str) -> RedisListClient:
        return RedisListClient(store)


class RedisStreamPeer(_RedisPeer):
    name = "redis-stream"
    label = "Redis stream (XREADGROUP)"
    batch_note = "100 XADD in one pipeline"
    caveats = (
        "in memory; durability is whatever the server is configured with (see settings)",
        "XACK leaves entries in the stream (no XDEL/MAXLEN by default)",
    )

    def setup(self, workdir: str, queues: tuple[str, ...]) -> str:
        prefix = super().setup(workdir, queues)
        r = _redis()
        for name in queues:
            r.xgroup_create(prefix + name, GROUP, id="0", mkstream=True)
        r.close()
        return prefix

    def open(self, store: str) -> RedisStreamClient:
        return RedisStreamClient(store)


PEERS = {"redis-list": RedisListPeer, "redis-stream": RedisStreamPeer}
