"""vpmon's verifier core: pure functions and small objects, numpy in and numpy out.

Nothing here opens a socket or imports asyncio; the CLI and the gateway (``streamer``) call the same
stages, so offline scoring and live monitoring share one code path.
"""
