"""babel_sync: cross-region sync of object stores (engine, CLI, service)."""
