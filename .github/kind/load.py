"""Steady GETs against the users Service from inside the kind cluster, each on a new connection, for
SECONDS seconds; prints the counts and exits 1 if any request failed."""

import collections
import os
import time
import urllib.error
import urllib.request

URL = os.environ.get("URL", "http://users/users/1")
SECONDS = float(os.environ.get("SECONDS", "90"))
counts = collections.Counter()
deadline = time.monotonic() + SECONDS
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(URL, timeout=5) as response:
            response.read()
            counts["ok" if response.status == 200 else f"status {response.status}"] += 1
    except urllib.error.HTTPError as exc:
        counts[f"status {exc.code}"] += 1
    except (urllib.error.URLError, OSError) as exc:
        counts[type(getattr(exc, "reason", exc)).__name__] += 1
    time.sleep(0.01)
failed = sum(n for kind, n in counts.items() if kind != "ok")
print(f"load: {sum(counts.values())} requests, {failed} failed: {dict(counts)}", flush=True)
raise SystemExit(1 if failed else 0)
