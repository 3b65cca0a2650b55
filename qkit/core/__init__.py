"""Core: errors, the content-addressed store, provenance."""
