"""Message schemas: .proto files compiled at load time, and the per-command body codecs."""
