"""Prefect flows: the wiring. They decide order and policy and hold no torch or pandas logic."""
