"""One inference process holds the device sessions of every worker: wire.py (the messages), client.py (a
worker's side), server.py (the process) and keeper.py (the supervisor's side: start, heartbeat, replace)."""
