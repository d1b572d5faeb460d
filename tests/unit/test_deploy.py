"""The deployment examples in docs/deploy are valid files that run this package's real commands: Kubernetes
manifests and the Compose file parse, name what they must, and every health check they run is a valid
``scheduller_status`` command line; the systemd units are complete. (Prometheus loads the alert rules and the
Prometheus configuration in tests/integration/test_metrics.py.)"""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"


def _status_parser() -> Any:
    from celery_scheduller.management.commands.scheduller_status import Command

    return Command().create_parser("manage.py", "scheduller_status")


def _check_status_command(argv: list[str]) -> None:
    """``argv`` is ``python manage.py scheduller_status …`` with options the command takes."""
    assert argv[:3] == ["python", "manage.py", "scheduller_status"], argv
    options = _status_parser().parse_args(argv[3:])
    assert options.check, argv


def _beat(argv: list[str]) -> bool:
    return "beat" in argv and argv[argv.index("beat") + 1 : argv.index("beat") + 3] == ["-S", "celery_scheduller"]


def test_the_kubernetes_manifests() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "celery-scheduller.yml").read_text()))
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in documents}
    assert {("Job", "proj-migrate"), ("Deployment", "proj-beat"), ("Deployment", "proj-worker")} <= kinds
    for doc in documents:
        assert doc["apiVersion"] and doc["metadata"]["name"]
        if doc["kind"] in ("Deployment", "Job"):
            spec = doc["spec"]["template"]["spec"]
            for container in spec["containers"]:
                assert container["image"] and container["command"]
                probe = container.get("livenessProbe", {}).get("exec", {}).get("command")
                if probe and "scheduller_status" in probe:
                    _check_status_command(probe)
        if doc["kind"] == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
    beat = next(doc for doc in documents if doc["metadata"]["name"] == "proj-beat")
    assert beat["spec"]["replicas"] >= 2 and _beat(beat["spec"]["template"]["spec"]["containers"][0]["command"])


def test_the_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    beats = [name for name, service in services.items() if _beat(service.get("command", []))]
    assert len(beats) == 2
    for name in [*beats, "worker", "web"]:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    for service in services.values():
        check = service.get("healthcheck", {}).get("test", [])
        if "scheduller_status" in check:
            _check_status_command(check[1:])  # after "CMD"
    assert services["worker"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for config in job["static_configs"] for t in config["targets"]}
    assert {target.split(":")[0] for target in targets} == {*beats, "worker", "web"}


def test_the_systemd_units() -> None:
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert [unit.name for unit in units] == ["celery-scheduller-beat.service", "celery-scheduller-worker@.service"]
    for unit in units:
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        parser.optionxform = str  # type: ignore[assignment, method-assign]
        parser.read(unit)
        assert {"Unit", "Service", "Install"} <= set(parser.sections()), unit
        argv = shlex.split(parser["Service"]["ExecStart"])
        assert argv[0].endswith("/celery") and argv[1:3] == ["-A", "proj"]
        assert parser["Service"]["Restart"] == "always" and parser["Install"]["WantedBy"] == "multi-user.target"
    beat = configparser.ConfigParser(interpolation=None, strict=False)
    beat.read(units[0])
    assert _beat(shlex.split(beat["Service"]["ExecStart"]))
