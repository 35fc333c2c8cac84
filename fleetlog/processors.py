"""`fleetlog.processors`: the session-processor registry and contract.

`register(p)` in code, or the `fleetlog.processors` entry point group; `get_processor(name)`
(None if unknown) and `list_processor_names()` (sorted). The runner is
`fleet.processors.run(...)`; the bookkeeping helpers `compute_file_hash` (MD5) and
`parse_jsonl` are here too.
"""

from fleetlog.services.client.processors.files import compute_file_hash, parse_jsonl
from fleetlog.services.client.processors.registry import (
    ENTRY_POINT_GROUP,
    Processor,
    ProcessorResult,
    get_processor,
    list_processor_names,
    register,
    unregister,
)
from fleetlog.services.client.processors.runner import UnknownProcessor

__all__ = [
    "ENTRY_POINT_GROUP",
    "Processor",
    "ProcessorResult",
    "UnknownProcessor",
    "compute_file_hash",
    "get_processor",
    "list_processor_names",
    "parse_jsonl",
    "register",
    "unregister",
]
