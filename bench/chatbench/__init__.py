"""chatbench: the Infinite Chat load generator and benchmark runner (bench/README.md)."""

VERSION = "1.0.0"
