"""vpmon's asyncio gateway and command-line entry point (a thin shell around ``verifier``)."""
