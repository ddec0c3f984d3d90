"""The agents registry and interests of the PostgreSQL backend on the real server (issue 15,
in progress): as the SQLite backend keeps them, ids sorted byte by byte."""

from __future__ import annotations

from postgres_server import pg_bus, pg_schema

from sqlbus.postgres import agents

__all__ = ["pg_bus", "pg_schema"]  # fixtures



def test_the_registry_keeps_first_registration_and_latest_sight(pg_bus) -> None:
    conn, schema = pg_bus
    agents.register_agent(conn, schema, "bob", 1_000)
    agents.register_agent(conn, schema, "Zed", 1_500)
    agents.touch_agent(conn, schema, "bob", 3_000, status="busy")
    agents.touch_agent(conn, schema, "bob", 2_000)  # never back in time
    agents.register_agent(conn, schema, "alice", 2_500)
    rows = agents.list_agents(conn, schema)
    assert [(r.id, r.registered_at, r.last_seen, r.status) for r in rows] == [
        ("Zed", 1_500, 1_500, "active"), ("alice", 2_500, 2_500, "active"),
        ("bob", 1_000, 3_000, "busy"),
    ]  # byte order: upper case first, as SQLite's BINARY
    assert agents.agent_ids(conn, schema) == ["Zed", "alice", "bob"]
    agents.register_agent(conn, schema, "bob", 4_000)
    assert agents.list_agents(conn, schema)[2].status == "active"


def test_interests_are_recorded_once_and_found_by_type_and_event(pg_bus) -> None:
    conn, schema = pg_bus
    agents.add_interest(conn, schema, "bob", "type", "state_change", 1)
    agents.add_interest(conn, schema, "bob", "type", "state_change", 2)  # kept at 1
    agents.add_interest(conn, schema, "carol", "type", "*", 3)
    agents.add_interest(conn, schema, "dave", "event", "build.*", 4)
    agents.add_interest(conn, schema, "erin", "type", "event", 5)
    assert [tuple(r) for r in agents.list_interests(conn, schema, "bob")] == [
        ("bob", "type", "state_change", 1)]
    assert agents.interested_in_type(conn, schema, "state_change", "carol") == ["bob"]
    assert agents.interested_in_type(conn, schema, "state_change", "alice") == ["bob", "carol"]
    found = agents.event_interests(conn, schema, "alice")
    assert found[0] == ("dave", "build.*")  # patterns first, then the type interests
    assert sorted(found[1:]) == [("carol", None), ("erin", None)]
    assert ("dave", "build.*") not in agents.event_interests(conn, schema, "dave")
    agents.drop_interest(conn, schema, "carol", "type", "*")
    assert agents.interested_in_type(conn, schema, "state_change", "alice") == ["bob"]
    assert len(agents.list_interests(conn, schema)) == 3
