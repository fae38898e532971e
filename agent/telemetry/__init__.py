"""Telemetry snapshots of an agent: its metrics regrouped per model and version, plus GPU statistics."""
