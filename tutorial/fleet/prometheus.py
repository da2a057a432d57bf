"""Debian's Prometheus beside the fleet (chapter 10 on): every replica's /metrics and HAProxy's own
exporter, scraped from a targets file the fleet rewrites as replicas come and go, as a cluster's
Prometheus follows pods it discovers. Our own process on loopback, with its own config and data
folder: a prometheus service the package may have started is left alone."""

from __future__ import annotations

import datetime
import json
import re
import signal
import urllib.parse
from pathlib import Path

from tutorial.parts import process, waiting

from .processes import FleetError, Part, tool

# A short-lived fleet on one machine: a scrape every second, so a test or a rollout sees its
# traffic counted within a second or two. A cluster's Prometheus scrapes every 15 to 30 s.
SCRAPE_INTERVAL = 1
INSTALL = "install it with `apt install prometheus` (Debian, Ubuntu) or `brew install prometheus`"


def missing() -> str | None:
    return None if tool("prometheus") else f"prometheus not found: {INSTALL}"


class Prometheus:
    def __init__(self, runtime: Path, port: int, haproxy_metrics: str):
        """`haproxy_metrics`: host:port of HAProxy's exporter."""
        self.runtime, self.port, self.haproxy_metrics = runtime, port, haproxy_metrics
        self.folder = runtime / "prometheus"
        self.targets_file = self.folder / "replicas.json"
        self.part: Part | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.part is not None and self.part.alive

    def config(self) -> str:
        every = f"{SCRAPE_INTERVAL}s"
        return json.dumps(  # YAML is a superset of JSON: no YAML writer needed
            {
                "global": {"scrape_interval": every, "scrape_timeout": every},
                "scrape_configs": [
                    {
                        "job_name": "users",
                        # the fleet rewrites it; Prometheus reads it again on each change
                        "file_sd_configs": [{"files": [str(self.targets_file)]}],
                    },
                    {
                        "job_name": "haproxy",
                        "static_configs": [{"targets": [self.haproxy_metrics]}],
                    },
                ],
            },
            indent=1,
        )

    def set_replicas(self, replicas: dict[str, str]) -> None:
        """Scrape these replicas (name: host:port of its metrics listener), and no others. Written
        whole and renamed into place, so Prometheus never reads half a file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        groups = [
            {"targets": [address], "labels": {"replica": name}}
            for name, address in sorted(replicas.items())
        ]
        scratch = self.targets_file.with_suffix(".tmp")
        scratch.write_text(json.dumps(groups))
        scratch.replace(self.targets_file)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.targets_file.exists():
            self.set_replicas({})
        cfg = self.folder / "prometheus.yml"
        cfg.write_text(self.config())
        self.part = Part(
            "prometheus",
            [
                tool("prometheus"),
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            self.runtime / "prometheus.log",
        )
        try:
            waiting.until(
                lambda: self._ready(),
                timeout=30,
                retry_on=(OSError,),
                waiting_for=f"Prometheus on 127.0.0.1:{self.port}/-/ready",
            )
        except TimeoutError as exc:
            raise FleetError(f"{exc}; its log ends: {self.part.tail(2)}") from None

    def _ready(self) -> bool:
        if not self.part.alive:
            raise FleetError(f"prometheus exited at start: {self.part.tail(3)}")
        return process.get(self.url + "/-/ready", timeout=2)[0] == 200

    def stop(self) -> None:
        if self.part:
            self.part.stop(signal.SIGTERM, timeout=10)

    # -- what it saw -------------------------------------------------------------------------------
    def api(self, path: str, **query: str) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        status, body = process.get(url, timeout=5)
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise FleetError(f"Prometheus answered {status} to {url}: {answer.get('error')}")
        return answer["data"]

    def targets(self) -> list[dict]:
        """The active targets: job, instance, health ("up", "down", "unknown"), last scrape."""
        return [
            {
                "job": t["labels"]["job"],
                "instance": t["labels"]["instance"],
                "health": t["health"],
                "last_scrape": _when(t["lastScrape"]),
            }
            for t in self.api("targets", state="active")["activeTargets"]
        ]

    def value(self, promql: str) -> float | None:
        """An instant query's one number (None: no series)."""
        result = self.api("query", query=promql)["result"]
        if not result:
            return None
        if len(result) > 1:
            raise FleetError(f"{promql} gave {len(result)} series; sum() it")
        return float(result[0]["value"][1])

    def wait_scraped_after(self, moment: datetime.datetime, timeout: float = 20) -> list[dict]:
        """Until every target that is up has been scraped since `moment`: what happened before it
        is then in Prometheus. The targets."""

        def fresh() -> list[dict] | None:
            found = self.targets()
            up = [t for t in found if t["health"] == "up"]
            return found if up and all(t["last_scrape"] > moment for t in up) else None

        return waiting.until(
            fresh,
            timeout=timeout,
            retry_on=(OSError, ValueError),
            waiting_for="a scrape of every target that is up",
        )


def _when(stamp: str) -> datetime.datetime:
    """Go's RFC 3339 time, nanoseconds and all, as a datetime (microseconds)."""
    head, fraction, zone = re.fullmatch(
        r"(.*?T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp
    ).groups()
    zone = "+00:00" if zone == "Z" else zone
    return datetime.datetime.fromisoformat(f"{head}.{(fraction or '0')[:6]:0<6}{zone}")
