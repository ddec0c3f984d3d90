import threading

import sqlbus

with sqlbus.connect("agents.db") as bus:
    alice, bob = bus.agent("alice"), bus.agent("bob")

    def on_task(message):                               # runs with no transaction open
        task = message.payload["task"]
        sqlbus.current_delivery().publish(              # buffered: committed with the ack
            "alice", "task_result", {"task_id": task["id"], "status": "completed"})

    bob.subscribe("task_assignment", on_task)
    bob.subscribe("request", lambda message: {"answer": message.payload["q"] * 2})
    bob.events.on("build.done", lambda event: print("bob saw", event.name, event.data))
    loop = threading.Thread(target=bob.run)             # until bob.stop(), SIGINT or SIGTERM
    loop.start()

    alice.publish("bob", "task_assignment", {"task": {"id": "t1", "type": "build"}})
    alice.events.emit("build.done", {"sha": "abc123"})  # to every agent listening, not alice
    print("bob answered", alice.request("bob", {"q": 21}, timeout=5.0))  # a round trip
    for d in alice.receive(wait=5.0):                   # bob's task_result
        with d:
            print("alice got", d.message.type, d.message.payload)
    bob.stop()                                          # in-flight work finishes first
    loop.join()
