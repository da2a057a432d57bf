"""The load test: `python -m bench` (or `make bench`). See bench/README.md.

Modules: variants (what is measured), servers (starting and stopping what is measured), load
(wrk and pgbench), cpu (CPU per process), data (the database), report (JSON, tables, charts),
bare_app (the bare aiohttp yardstick), __main__ (the run).
"""
