"""The local Privicore-compatible engine: ``privifs engine``.

A faithful local server for the wire protocol in the project's reference: an HTTP API, a
WebSocket proxy, an upstream stream server and a downstream download server, each on its own
port. State lives in one SQLite database (synchronous commits) and one file per blob under the
data directory. See docs/engine.md.
"""
