"""The serving defaults, defined once: ``ServerOptions``, ``BatcherConfig`` and ``ranker serve`` read them here.

Standard library only, so the command line can show them without importing gRPC or the model.
"""

from __future__ import annotations

MAX_CANDIDATES = 1000  # the most candidates one request may carry
MAX_MESSAGE_MB = 16  # the largest request or response message, MiB
RELOAD_INTERVAL_S = 30.0  # poll the model URI this often and swap in a new version; 0 = never
MAX_BATCH_CANDIDATES = 1000  # the most candidates in one batched forward pass
MAX_QUEUE_DELAY_US = 2000  # the longest a request may wait for its batch to fill, spent only while others are expected
MAX_QUEUE = 256  # requests waiting; beyond: RESOURCE_EXHAUSTED at once
MAX_QUEUE_WAIT_MS = 0.0  # refuse a request whose expected wait exceeds this; 0 = no server budget
