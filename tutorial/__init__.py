"""Tooling for the tutorial repository: the chapter manifest, a local PostgreSQL, the runner and
checker.

Nothing under chapters/ imports this package: a chapter needs only its own requirements.
"""
