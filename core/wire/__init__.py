"""What travels between the tiers: the round protocol and its headers, tensor
payloads (safetensors, never pickle), lossy compression, signed updates, secure
aggregation's messages and maths, and a client's report of a failed task.

Every module here is pure bytes-and-numbers code, with no I/O of its own, so
that the worker, the combiner and the global aggregator agree by construction.
"""
