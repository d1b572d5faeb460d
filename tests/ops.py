"""What the operations tests run beside the code under test: beat and worker subprocesses on a queue of their
own (the session's worker never takes their tasks), free ports, a real Prometheus server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, start_celery, stop


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def subprocess_env(queue: str, **extra: str) -> dict[str, str]:
    """The environment of a beat or worker on the test database, publishing to and consuming ``queue``."""
    from django.db import connection

    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "CSCHED_DB_NAME": str(connection.settings_dict["NAME"]),
        "CSCHED_QUEUE": queue,
        "CSCHED_LOG": "INFO",
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def start_beat(log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    schedule = str(log.with_suffix(".schedule"))
    return start_celery(log, ["beat", "-S", "celery_scheduller", "-l", "INFO", "-s", schedule], env, "beat: Starting")


def start_worker(log: Path, env: dict[str, str], pool: str, concurrency: int, name: str) -> subprocess.Popen[bytes]:
    argv = ["worker", "-P", pool, "-c", str(concurrency), "-l", "INFO", "-Q", env["CSCHED_QUEUE"]]
    argv += ["-n", f"{name}-{os.getpid()}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    return start_celery(log, argv, env, "ready.")


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        stop(proc)


class Prometheus:
    """A real Prometheus server (Debian's ``prometheus``) scraping ``targets`` every second."""

    def __init__(self, workdir: Path, targets: dict[str, list[int]], rules: Path | None = None) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed (Debian's prometheus package; .ci/run installs it)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        jobs = [
            {
                "job_name": job,
                "scrape_interval": "1s",
                "scrape_timeout": "900ms",
                "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in ports]}],
            }
            for job, ports in targets.items()
        ]
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": jobs,
        }
        if rules is not None:
            config["rule_files"] = [str(rules)]
        config_file = workdir / "prometheus.yml"
        config_file.write_text(json.dumps(config))  # JSON is YAML
        self.log = workdir / "prometheus.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"prometheus did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector ``promql`` gives now."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, promql: str) -> float | None:
        """The single value of ``promql`` (None when it has none)."""
        found = self.query(promql)
        return None if not found else float(found[0]["value"][1])

    def by(self, promql: str, label: str) -> dict[str, float]:
        return {item["metric"].get(label, ""): float(item["value"][1]) for item in self.query(promql)}

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as answer:
            return json.loads(answer.read())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
