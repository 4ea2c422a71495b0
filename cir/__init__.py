"""cir: a high-throughput trainer that teaches language models to reason with a code interpreter."""

__version__ = "0.1.0"
