"""The benchmarks' harness: what every benchmarks/bench_*.py script is built on.

- tables.py: the gateway tables the benches serve, on free loopback ports;
- processes.py: the processes a bench starts (the C echo upstream, `tlvproxy
  serve`, any child that says where it listens), always stopped, and what
  they cost (CPU time, resident memory);
- load.py: wrk runs against a gateway and the figures they give;
- sessions.py: json-mode WebSocket sessions, and what idle ones cost the gateway;
- figures.py: the one way figures are printed (tables and target verdicts),
  medians over rounds, timings of repeated calls.

A bench script says what it measures and prints its figures only through
figures.py (docs/development.md "Benchmarks"). Nothing here is imported by
the gateway, and nothing here asserts a speed.
"""
