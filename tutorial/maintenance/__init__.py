"""Keeping the repository healthy: the .venv bootstrap (venv.sh), `make freshness` and
`make soak`."""
