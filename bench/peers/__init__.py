"""Reference relays built on other Python WebSocket libraries.

Each one is a standalone script with fastrelay's semantics (room = request
path without the query, every message goes to every member of the room,
sender included, same opcode) written the way the library's docs recommend
for speed, so that the benchmark compares fastrelay with a fair best effort.
"""
