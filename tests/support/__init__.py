"""Helpers for the tests: the Compose stack under test and a protocol v1 client."""
