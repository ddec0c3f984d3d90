"""sqlbus: a durable, transactional message bus for agents, inside one SQLite file.

>>> import sqlbus
>>> bus = sqlbus.connect("team.db")                       # doctest: +SKIP
>>> alice, bob = bus.agent("alice"), bus.agent("bob")     # doctest: +SKIP
>>> alice.publish("bob", "task_assignment", {"task": {"id": "t1", "type": "build"}})  # doctest: +SKIP
>>> for d in bob.receive(limit=10, wait=1.0):             # doctest: +SKIP
...     with d:
...         print(d.message.payload)
"""

from .agent import Agent
from .bus import Bus, connect
from .delivery import Delivery, current_delivery
from .errors import (
    AuthenticationError,
    DatabaseError,
    Discard,
    LeaseLostError,
    NotFoundError,
    PayloadTooLargeError,
    RemoteError,
    RequestTimeoutError,
    Retry,
    SqlbusError,
    ValidationError,
    VersionConflictError,
)
from .events import Event, Events
from .messages import (
    MESSAGE_TYPES,
    Headers,
    Health,
    Message,
    Progress,
    StatusUpdate,
    Task,
    TaskAssignment,
    TaskError,
    TaskMetrics,
    TaskResources,
    TaskResult,
    decode_payload,
)
from .metrics import AgentActivity, AgentStats, Metrics, QueueDepth, Throughput
from .ops import (
    BackupResult,
    CheckReport,
    InboxEntry,
    PeekPage,
    PruneResult,
    Retention,
    VacuumResult,
)
from .records import (
    AgentInfo,
    DeadLetter,
    Lease,
    MessageTrace,
    RecipientRecord,
    SentRecord,
    Subscription,
)
from .state import StateEntry, StateStore
from .transaction import Transaction

__version__ = "0.1.0"

__all__ = [
    # opening a bus
    "connect",
    "Bus",
    "Agent",
    "Delivery",
    "Transaction",
    # records
    "AgentInfo",
    "Subscription",
    "SentRecord",
    "DeadLetter",
    "StateEntry",
    "StateStore",
    # handlers, request/response and events (sqlbus.worker)
    "current_delivery",
    "Event",
    "Events",
    # operations: metrics and upkeep (sqlbus.metrics)
    "Metrics",
    "Throughput",
    "QueueDepth",
    "AgentActivity",
    "AgentStats",
    "InboxEntry",
    "PeekPage",
    "Lease",
    "MessageTrace",
    "RecipientRecord",
    "PruneResult",
    "Retention",
    "CheckReport",
    "BackupResult",
    "VacuumResult",
    # messages and typed payloads
    "MESSAGE_TYPES",
    "Message",
    "Headers",
    "TaskAssignment",
    "Task",
    "TaskResources",
    "TaskResult",
    "TaskError",
    "TaskMetrics",
    "StatusUpdate",
    "Progress",
    "Health",
    "decode_payload",
    # errors
    "SqlbusError",
    "ValidationError",
    "PayloadTooLargeError",
    "DatabaseError",
    "LeaseLostError",
    "VersionConflictError",
    "NotFoundError",
    "RequestTimeoutError",
    "RemoteError",
    "AuthenticationError",
    # control-flow signals for handlers
    "Retry",
    "Discard",
]
