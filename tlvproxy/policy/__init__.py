"""Traffic policy for REST and WebSocket (SPEC 4.4): rate limits and the WAF.

Owns: the pure decision of whether a request or message may pass.
Must not: import trio, read a clock, log or count metrics; the servers do that
with the verdicts these modules return.
"""
