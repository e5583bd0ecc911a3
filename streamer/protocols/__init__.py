"""Sans-I/O telephony protocol adapters: messages in, events out; events in, messages out.

Each adapter is a plain object driven by the websocket layer (``streamer/gateway.py``) and by tests with
transcripts of JSON and bytes; none of them touches a socket. See ``events.py`` for the shared events.
"""
