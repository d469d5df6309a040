"""tokenfab bench: load any OpenAI-compatible endpoint, measure the throughput-interactivity curve, with energy."""
