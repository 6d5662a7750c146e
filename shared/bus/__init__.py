"""The message bus contract: subjects, message structs, stream configs and publish helpers."""
