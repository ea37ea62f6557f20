"""Where rate-limit buckets live (docs/configuration.md "Where the buckets live"):
`store: local` in an LMDB file every worker of one gateway maps, `store: redis`
in a Redis every gateway using it shares, and the one interface the servers
call for both (`limits.RateLimits`).

Owns: the state shared between processes and machines, and the clocks it is
kept on. The arithmetic is the reference's (tlvproxy/policy/ratelimit.py).
Must not: answer requests or render errors; the servers do that with the
verdicts returned here.
"""
