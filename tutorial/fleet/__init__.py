"""Chapter 07 on one machine: `make fleet` (fleet.py and the parts it starts) and `make rollout`
(rollout.py), both with the numbers of the chapter's manifests (budget.py)."""
