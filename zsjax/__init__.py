"""zsjax: ZeroSearch-style RL for search-using LLMs, in JAX."""

__version__ = "0.1.0"
