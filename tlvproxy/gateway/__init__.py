"""The parts one worker's `Gateway` (app.py) is composed of: its listeners
and the client connections they accept, its upstream pools, the
certificates its handshakes use, its rate-limit stores and the key sets its
authenticators fetch.

Owns: what the gateway runs beside the servers, one concept per module.
Must not: parse HTTP, frames or YAML (the servers and the loader do), or
hold the current table: app.py swaps it and hands each part what it needs.
"""
