"""Benchmarks behind ``cir bench ...``: each subcommand is one module with ``register``/``run``."""
