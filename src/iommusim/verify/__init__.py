"""Cross-vendor verification: a reference model, state machines and sweeps."""
