"""Traffic policy for REST and WebSocket: rate limits, the WAF, splits and the
answers kept for fallbacks (docs/configuration.md "rate_limits", "waf",
"split" and "fallback").

Owns: the pure decision of whether a request or message may pass, where it
goes, and which earlier answer may stand in for a missing one.
Must not: import trio, read a clock, log or count metrics; the servers do that
with the verdicts these modules return (and pass the time in).
"""
