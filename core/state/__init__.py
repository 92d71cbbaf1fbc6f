"""What outlives a process: round state in Redis (``roundstate``), the lease
that keeps one writer per role, the global model's checkpoints, and starting a
real ``redis-server`` for the embedded runtime and the tests.
"""
