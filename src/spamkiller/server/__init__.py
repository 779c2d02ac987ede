"""The asyncio driver: sockets, timers, TLS handshakes, and the composition root (app.py)."""
