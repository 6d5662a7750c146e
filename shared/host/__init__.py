"""The service host: the frame every Gantry service runs in (broker, state store, snapshot feed, pull loops).

Layers, each importing only those below it: ``shared.core`` (pure domain and decisions) → ``shared.bus``
(messages, subjects, streams, wire helpers) and ``shared.state`` (Redis) → ``shared.host`` → ``services``.
"""
