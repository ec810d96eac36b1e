"""Helpers shared by the test suites: sample results and a reader for offline W&B runs."""
