"""The real parts the tools and tests start: a PostgreSQL (database.py), a Docker engine and the
stand-in base image it builds on (docker_engine.py, standin.py), a chapter as a learner runs it
(process.py), and the one way to wait for any of them (waiting.py)."""
