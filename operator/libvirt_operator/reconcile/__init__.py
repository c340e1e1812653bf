"""Reconcile logic: pure planning plus the orchestration that applies a plan through adapters."""
