"""Core: API types, the error catalog, conditions and observability primitives. Imports nothing above it."""
