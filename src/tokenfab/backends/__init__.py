"""Engines behind the gateway: the Backend interface (base) and its implementations."""
