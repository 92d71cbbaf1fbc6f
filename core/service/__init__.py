"""What every long-running service needs and nothing else: serving HTTP with
bearer tokens, the ``fedkube_*`` metrics, structured logs, long polls, backoff
while something is away, the credentials a combiner checks, test-only fault
points, and child-process hygiene.
"""
