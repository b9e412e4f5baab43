"""The serving defaults, defined once: ``ServerOptions``, ``BatcherConfig``, ``ranker serve`` and the
deployment files under ``deploy/`` (checked against these by ``tests/serving/test_deploy.py``) read them here.

Standard library only, so the command line can show them without importing gRPC or the model.
"""

from __future__ import annotations

HOST = "127.0.0.1"  # ``ranker serve`` binds loopback unless told otherwise (a container passes --host 0.0.0.0)
PORT = 50051  # the gRPC port of ``ranker serve`` (and of the container image)
METRICS_PORT = 9100  # where deployments serve Prometheus /metrics (``--metrics-port``; off when not given)
HEALTH_SERVICE = "ranking.v1.Ranker"  # the grpc.health.v1 service name probes and clients ask about ("" too)
# On SIGTERM: health NOT_SERVING at once, then DRAIN_S of serving as usual while health-checking clients
# move their new calls elsewhere, then GRACE_S for the calls in flight to finish. Without the drain, a
# call that reaches the server just as it stops is failed with CANCELLED (grpc/grpc#41785).
DRAIN_S = 1.0
GRACE_S = 5.0
# A connection older than this is closed with GOAWAY (the client reconnects at once, without failing a
# call), so clients balancing over a headless Service re-resolve and spread onto replicas added since.
MAX_CONNECTION_AGE_S = 300.0
MAX_CANDIDATES = 1000  # the most candidates one request may carry
MAX_MESSAGE_MB = 16  # the largest request or response message, MiB
RELOAD_INTERVAL_S = 30.0  # poll the model URI this often and swap in a new version; 0 = never
MAX_BATCH_CANDIDATES = 1000  # the most candidates in one batched forward pass
MAX_QUEUE_DELAY_US = 2000  # the longest a request may wait for its batch to fill, spent only while others are expected
MAX_QUEUE = 256  # requests waiting; beyond: RESOURCE_EXHAUSTED at once
MAX_QUEUE_WAIT_MS = 0.0  # refuse a request whose expected wait exceeds this; 0 = no server budget
