"""Traffic policy for REST and WebSocket: rate limits and the WAF (docs/configuration.md
"rate_limits" and "waf").

Owns: the pure decision of whether a request or message may pass.
Must not: import trio, read a clock, log or count metrics; the servers do that
with the verdicts these modules return.
"""
