"""gRPC serving of the ranking model: request decoding, model holder, ``grpc.aio`` server, client.

Submodules are imported on demand (``serving.client`` needs neither torch nor the model), e.g.
``from serving.server import serve`` or ``from serving.client import RankerClient``.
"""
