"""Relay: see DESIGN.md."""
