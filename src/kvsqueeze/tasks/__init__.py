"""Offline long-context tasks."""
