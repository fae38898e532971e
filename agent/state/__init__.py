"""The agent's durable state: one SQLite database, ``<state_dir>/agent.db``.

It records which model versions the node has (and the digests of their
blobs), which version of each model is active, the swap journal, each
source's desired state, tag -> digest records and the cache's recency. One
package owns it: ``schema`` holds every table, the schema version and the
migrations; ``db`` (:class:`StateDB`) opens and migrates it and carries the
typed accessors (``tables``) the rest of the agent uses; ``sqlite`` is the
opener every SQLite file of the agent goes through (the MQTT outbox and
command log too). Start-up reads only this database and the blob store, never
the network. docs/ARCHITECTURE.md ("The database") describes the schema.
"""

from agent.state.db import ModelRecord, StateDB, VersionRecord
from agent.state.schema import SCHEMA_VERSION
from agent.state.tables import DesiredRow, DesiredTable, ImageTags, SwapJournal, SwapRecord, TagRecord, VersionAccess

__all__ = [
    "SCHEMA_VERSION",
    "DesiredRow",
    "DesiredTable",
    "ImageTags",
    "ModelRecord",
    "StateDB",
    "SwapJournal",
    "SwapRecord",
    "TagRecord",
    "VersionAccess",
    "VersionRecord",
]
