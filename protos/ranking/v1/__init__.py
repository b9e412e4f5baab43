"""``ranking.v1``: the Ranker service (``ranker.proto``) and its generated stubs."""
