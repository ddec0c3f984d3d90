"""An outbox block is all or nothing even when the database ends its transaction early, and a
write of its own on the block's thread (asyncio: task) fails at once instead of waiting."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from pathlib import Path

import pytest
from probes import SQLiteProbe

import sqlbus
import sqlbus.aio
from sqlbus import DatabaseError

# The tests of a block the database itself rolled back use SQLite's RAISE(ROLLBACK) trigger and
# run on SQLite alone (on PostgreSQL a failing statement undoes only itself, to a savepoint);
# those of writes of their own inside an open block run on both backends.
pytestmark = pytest.mark.backends


def _with_app_table(path: Path) -> None:
    """The application's own table, with a trigger that makes SQLite roll back the whole
    transaction when a negative amount is inserted."""
    SQLiteProbe(path).write(
        "CREATE TABLE orders(id INTEGER PRIMARY KEY, amount INTEGER);"
        "CREATE TRIGGER no_negative BEFORE INSERT ON orders WHEN NEW.amount < 0 "
        "BEGIN SELECT RAISE(ROLLBACK, 'negative amount'); END;"
    )


def _rows(path: Path) -> tuple[int, int, int]:
    """(orders, messages sent, state keys) as another connection sees them."""
    orders = SQLiteProbe(path).sql("SELECT count(*) FROM orders")[0][0]
    with sqlbus.connect(path) as bus:
        return orders, len(bus.sent(limit=1000)), len(bus.state.keys())


def test_after_the_database_rolls_the_block_back_every_later_call_fails_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bus.db"
    with sqlbus.connect(path) as bus:
        _with_app_table(path)
        alice = bus.agent("alice")
        bus.agent("bob")
        with pytest.raises(DatabaseError, match="ended this transaction"):
            with alice.transaction() as tx:
                tx.execute("INSERT INTO orders(amount) VALUES (10)")
                tx.publish("bob", "notification", {"order": 1}, ttl=0)
                with pytest.raises(DatabaseError, match="negative amount"):
                    tx.execute("INSERT INTO orders(amount) VALUES (-1)")
                # The caller caught that: every later call must fail and write nothing.
                with pytest.raises(DatabaseError):
                    tx.publish("bob", "notification", {"order": 2}, ttl=0)
                with pytest.raises(DatabaseError):
                    tx.state.set("order/2", {"amount": 5})
                with pytest.raises(DatabaseError):
                    tx.execute("INSERT INTO orders(amount) VALUES (20)")
                with pytest.raises(DatabaseError):
                    tx.publish_many([{"to": "bob", "type": "notification"}])
                with pytest.raises(DatabaseError):
                    tx.broadcast("notification", {})
                with pytest.raises(DatabaseError):
                    tx.state.get("order/2")
            # leaving the block raises too (no "no transaction is active")
        assert _rows(path) == (0, 0, 0)
        # The bus and its connection are fine afterwards.
        with alice.transaction() as tx:
            tx.execute("INSERT INTO orders(amount) VALUES (30)")
            tx.publish("bob", "notification", {"order": 3}, ttl=0)
        assert _rows(path) == (1, 1, 0)


def test_insert_or_rollback_ends_the_block_too(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    with sqlbus.connect(path) as bus:
        _with_app_table(path)
        alice = bus.agent("alice")
        bus.agent("bob")
        with pytest.raises(DatabaseError):
            with alice.transaction() as tx:
                tx.execute("INSERT INTO orders(id, amount) VALUES (1, 1)")
                tx.publish("bob", "notification", {}, ttl=0)
                try:
                    tx.execute("INSERT OR ROLLBACK INTO orders(id, amount) VALUES (1, 2)")
                except DatabaseError:
                    pass
                with pytest.raises(DatabaseError):
                    tx.publish("bob", "notification", {}, ttl=0)
        assert _rows(path) == (0, 0, 0)


def test_an_exception_leaving_an_ended_block_is_the_callers_own(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    with sqlbus.connect(path) as bus:
        _with_app_table(path)
        alice = bus.agent("alice")
        with pytest.raises(KeyError):
            with alice.transaction() as tx:
                try:
                    tx.execute("INSERT INTO orders(amount) VALUES (-1)")
                except DatabaseError:
                    pass
                raise KeyError("mine")
        assert _rows(path) == (0, 0, 0)


def test_an_async_block_rolled_back_by_the_database_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    sqlbus.connect(path).close()
    _with_app_table(path)

    async def main() -> None:
        async with await sqlbus.aio.connect(path) as bus:
            alice = await bus.agent("alice")
            await bus.agent("bob")
            with pytest.raises(DatabaseError, match="ended this transaction"):
                async with alice.transaction() as tx:
                    await tx.execute("INSERT INTO orders(amount) VALUES (10)")
                    await tx.publish("bob", "notification", {}, ttl=0)
                    with pytest.raises(DatabaseError):
                        await tx.execute("INSERT INTO orders(amount) VALUES (-1)")
                    with pytest.raises(DatabaseError):
                        await tx.publish("bob", "notification", {}, ttl=0)
                    with pytest.raises(DatabaseError):
                        await tx.state.set("k", 1)

    asyncio.run(main())
    assert _rows(path) == (0, 0, 0)


# -- writes of their own inside an open block ------------------------------------------------


def test_a_write_of_its_own_inside_a_block_raises_runtime_error_at_once(database) -> None:
    with database.connect() as bus:
        alice, bob = bus.agent("alice"), bus.agent("bob")
        bob.publish("bob", "notification", {}, ttl=0)
        (delivery,) = bob.receive()
        with alice.transaction() as tx:
            tx.publish("bob", "notification", {"n": "tx"}, ttl=0)
            for call in (
                lambda: alice.publish("bob", "notification", {}, ttl=0),
                lambda: alice.publish_many([{"to": "bob", "type": "notification"}]),
                lambda: alice.broadcast("notification", {}),
                lambda: bus.state.set("k", 1),
                lambda: alice.state.delete("k"),
                lambda: delivery.ack(),
                lambda: bob.receive(),
                lambda: bus.agent("carol"),
            ):
                with pytest.raises(RuntimeError, match="use|tx"):
                    call()
            # Reads are fine, and see the block's own writes.
            assert bus.state.get("k") is None
        delivery.ack()
        payloads = [r.message.payload for r in bus.sent(limit=10)]
        assert payloads.count({"n": "tx"}) == 1 and len(payloads) == 2
        assert bus.state.keys() == []
        assert {a.id for a in bus.agents()} == {"alice", "bob"}


def test_another_thread_is_not_refused_while_a_block_is_open(database) -> None:
    with database.connect(busy_timeout=30.0) as bus:
        alice = bus.agent("alice")
        bus.agent("bob")
        done: list[str] = []
        with alice.transaction() as tx:
            tx.publish("bob", "notification", {}, ttl=0)
            other = threading.Thread(
                target=lambda: done.append(alice.publish("bob", "notification", {}, ttl=0))
            )
            other.start()  # it waits for the block's lock, like another process would
        other.join(30)
        assert len(done) == 1
        assert len(bus.agent("bob").receive(limit=10)) == 2


def test_an_async_write_of_its_own_inside_a_block_raises_runtime_error(database) -> None:
    async def main() -> None:
        async with await database.aio_connect(busy_timeout=30.0) as bus:
            alice = await bus.agent("alice")
            await bus.agent("bob")
            async with alice.transaction() as tx:
                await tx.publish("bob", "notification", {"n": "tx"}, ttl=0)
                with pytest.raises(RuntimeError, match="tx"):
                    await alice.publish("bob", "notification", {}, ttl=0)
                with pytest.raises(RuntimeError, match="tx"):
                    await bus.state.set("k", 1)
                with pytest.raises(RuntimeError, match="tx"):
                    await alice.publish_many([{"to": "bob", "type": "notification"}])
                # Another task is not this block's: it waits for the lock like anyone else.
                other = asyncio.get_running_loop().create_task(
                    _publish_other(alice), context=contextvars.Context()
                )
            assert await asyncio.wait_for(other, 30)
            # After the block, writes of its own work again.
            await alice.publish("bob", "notification", {"n": "after"}, ttl=0)
            payloads = [r.message.payload for r in await bus.sent(limit=10)]
            assert sorted(map(str, payloads)) == sorted(
                map(str, [{"n": "tx"}, {"n": "other"}, {"n": "after"}])
            )
            assert await bus.state.keys() == []

    asyncio.run(main())


async def _publish_other(alice: sqlbus.aio.AsyncAgent) -> str:
    await asyncio.sleep(0)
    return await alice.publish("bob", "notification", {"n": "other"}, ttl=0)
