"""A websocket policy server speaking openpi's protocol, and its client (see server.py)."""
