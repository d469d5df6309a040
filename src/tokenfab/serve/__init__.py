"""OpenAI-compatible gateway over the embedded engine."""
