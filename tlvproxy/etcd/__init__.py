"""etcd, spoken through its v3 JSON gateway (docs/operations.md "Running a fleet")."""
