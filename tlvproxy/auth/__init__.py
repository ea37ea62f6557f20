"""Who the caller is: authenticators, the verified `Identity` (docs/security.md)."""
