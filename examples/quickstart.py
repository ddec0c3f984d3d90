import sqlbus

with sqlbus.connect("team.db") as bus:             # creates the file (mode 0600), WAL, schema
    coordinator, worker = bus.agent("coordinator"), bus.agent("worker-1")

    coordinator.publish("worker-1", "task_assignment",
                        {"task": {"id": "t1", "type": "resize", "parameters": {"w": 640}}},
                        priority=5, requires_ack=True)

    for d in worker.receive(limit=10, wait=1.0):   # claims with a lease (default 30 s)
        with d:                                    # clean exit acks; an exception fails it
            task = d.message.payload["task"]
            d.reply({"done": task["id"]})          # buffered: committed with the ack

    for d in coordinator.receive(limit=10):        # the reply and the ack notice
        with d:
            print(d.message.type, d.message.payload)

    bus.state.update("jobs/done", lambda n: (n or 0) + 1)   # versioned shared state
    print("jobs done:", bus.state.get("jobs/done").value, "dead letters:", len(bus.dead_letters()))
