"""The load test: `python -m bench` (or `make bench`). See bench/README.md.

Modules: variants (what is measured), servers (starting and stopping what is measured), load (wrk and
pgbench), cpu (CPU per process), data (the database), report (JSON, table, chart), __main__ (the run).
"""
