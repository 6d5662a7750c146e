"""The message bus contract: subjects, message structs, stream configs and wire helpers (no service frame:
that is ``shared.host``, which builds on this package and the state layer)."""
