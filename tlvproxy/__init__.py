"""tlvproxy: a REST and WebSocket gateway for TLV-framed binary TCP services."""

__version__ = "0.1.0"
