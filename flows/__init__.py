"""Prefect flows, one per file. Flows wire tasks; they hold no data logic."""
