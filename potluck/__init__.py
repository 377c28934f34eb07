"""The user-facing layer: command line, peer process, HTTP API."""
