"""Thin command-line front ends. Each module ``cli/<name>.py`` exposes ``register(subparsers)``."""
