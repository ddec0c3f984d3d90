import asyncio

import sqlbus.aio


async def main():
    async with await sqlbus.aio.connect("async.db") as bus:
        alice, bob = await bus.agent("alice"), await bus.agent("bob")

        async def consume(count):                       # a wait holds no thread
            seen = []
            while len(seen) < count:
                for d in await bob.receive(limit=10, wait=5.0):
                    async with d:                       # clean exit acks; an exception fails it
                        seen.append(d.message.payload["n"])
            return seen

        consumer = asyncio.create_task(consume(5))
        await alice.publish_many([{"to": "bob", "type": "notification", "payload": {"n": n}}
                                  for n in range(5)])   # one transaction
        print("bob got", await consumer)

asyncio.run(main())
