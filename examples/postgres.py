import os

import sqlbus

url = os.environ.get("SQLBUS_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
with sqlbus.connect(url, schema="quickstart") as bus:     # creates the schema on first use
    alice, bob = bus.agent("alice"), bus.agent("bob")     # agents on any host, same URL
    alice.publish("bob", "task_assignment", {"task": {"id": "t1", "type": "resize"}})
    for d in bob.receive(limit=10, wait=1.0):
        with d:                                            # acked on a clean exit
            print("bob got", d.message.payload["task"]["id"])
