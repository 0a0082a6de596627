"""Shared pytest configuration."""
import os

# Tests run on CPU; keep XLA from grabbing every core per worker.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
