"""The producer side of tokenfleet: the wire contract and the client (no torch, no engine).

    from tokenfleet.producer import Client
    async with Client("redis://localhost:6379") as client:
        final = await client.generate("What is the capital of France?", max_new_tokens=20)
"""

from tokenfleet.producer.client import Client, raise_for_error
from tokenfleet.producer.errors import (
    DeadlineExceededError,
    ExpiredRequestError,
    GenerationError,
    IncompleteGenerationError,
    OverloadedError,
    ResultTimeoutError,
    TokenfleetError,
    ValidationError,
)
from tokenfleet.producer.keys import Keys
from tokenfleet.producer.protocol import (
    ErrorEvent,
    Event,
    FinalEvent,
    Job,
    Message,
    Parameters,
    TokenEvent,
)
from tokenfleet.producer.sync_client import SyncClient

__all__ = [
    "Client",
    "DeadlineExceededError",
    "ErrorEvent",
    "Event",
    "ExpiredRequestError",
    "FinalEvent",
    "GenerationError",
    "IncompleteGenerationError",
    "Job",
    "Keys",
    "Message",
    "OverloadedError",
    "Parameters",
    "ResultTimeoutError",
    "SyncClient",
    "TokenEvent",
    "TokenfleetError",
    "ValidationError",
    "raise_for_error",
]
