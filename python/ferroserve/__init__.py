"""ferroserve: a fast self-hosted OpenAI-compatible inference server."""
__version__ = "0.1.0"
