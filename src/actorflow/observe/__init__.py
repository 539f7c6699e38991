"""Observability: structured events and metrics."""
