"""Tooling for the tutorial repository, one subpackage per job: learner/ (what a learner runs),
parts/ (the real parts the tools and tests start), fleet/ (chapter 07 on one machine), site/ (the
docs build) and maintenance/ (the .venv bootstrap, freshness, soak); chapters.py is the manifest
every one of them reads.

Nothing under chapters/ imports this package: a chapter needs only its own requirements.
"""
