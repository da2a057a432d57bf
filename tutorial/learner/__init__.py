"""What a learner runs: `make run` (run.py), `make check` (check.py) and the sentences its
verdicts are written in (expect.py)."""
