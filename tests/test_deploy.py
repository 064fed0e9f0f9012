"""The production shape, checked as far as a machine without a Docker engine allows."""

import os
import re
import subprocess
import sys

import pytest
import yaml
from django.test import Client

from diagnosis.services import create_analysis
from tests.conftest import ROOT
from tests.factories import PASSWORD, upload

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = ["migrate", "web", "worker", "beat"]
LONG_RUNNING = ["db", "redis", "web", "worker", "beat", "nginx"]
SETTINGS_SOURCE = (ROOT / "malaria_site" / "settings.py").read_text()
SETTINGS_VARS = set(re.findall(r'env(?:\.\w+)?\(\s*"([A-Z_]+)"', SETTINGS_SOURCE))
ENV_EXAMPLE_VARS = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
DEPLOY_SOURCES = (ROOT / "docker-compose.yml").read_text() + (ROOT / "deploy" / "gunicorn.conf.py").read_text()


def test_all_services_are_there_with_health_checks():
    assert set(LONG_RUNNING + ["migrate"]) <= set(SERVICES)
    for name in LONG_RUNNING:
        assert "healthcheck" in SERVICES[name], name
    assert SERVICES["migrate"]["command"][-2:] == ["migrate", "--noinput"]


def test_data_lives_in_named_volumes():
    assert {"pgdata", "media", "static"} <= set(COMPOSE["volumes"])
    assert "pgdata:/var/lib/postgresql/data" in SERVICES["db"]["volumes"]
    for name in ("web", "worker"):
        assert "media:/data/media" in SERVICES[name]["volumes"]
    assert "media:/data/media:ro" in SERVICES["nginx"]["volumes"]


def test_start_order_waits_for_health_and_migrations():
    web = SERVICES["web"]["depends_on"]
    assert web["db"]["condition"] == "service_healthy" and web["redis"]["condition"] == "service_healthy"
    assert web["migrate"]["condition"] == "service_completed_successfully"
    assert SERVICES["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert SERVICES["nginx"]["depends_on"]["web"]["condition"] == "service_healthy"


def test_workers_scale_and_run_under_gunicorn():
    assert "container_name" not in SERVICES["worker"] and "ports" not in SERVICES["worker"]
    assert "celery" in SERVICES["worker"]["command"] and "worker" in SERVICES["worker"]["command"]
    assert "gunicorn" in " ".join(SERVICES["web"]["command"])
    assert "beat" in SERVICES["beat"]["command"]


def test_protected_media_location_is_internal_and_matches_the_app():
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    prefix = SERVICES["web"]["environment"]["PROTECTED_MEDIA_ACCEL_PREFIX"]
    block = re.search(rf"location {re.escape(prefix)} \{{(.*?)\}}", nginx, re.S)
    assert block and "internal;" in block.group(1) and "alias /data/media/;" in block.group(1)
    assert SERVICES["web"]["environment"]["MEDIA_ROOT"] == "/data/media"


def test_environment_names_are_ones_the_settings_read():
    for name in APP_SERVICES:
        unknown = set(SERVICES[name]["environment"]) - SETTINGS_VARS
        assert not unknown, f"{name} sets variables settings.py never reads: {unknown}"
    undocumented = SETTINGS_VARS - ENV_EXAMPLE_VARS
    assert not undocumented, f"document these in .env.example: {undocumented}"
    unused = {v for v in ENV_EXAMPLE_VARS - SETTINGS_VARS if v not in DEPLOY_SOURCES}
    assert not unused, f".env.example lists variables nothing reads: {unused}"


def production_env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_URL"))}
    env.update(
        DJANGO_SETTINGS_MODULE="malaria_site.settings",
        DJANGO_DEBUG="false",
        DJANGO_SECRET_KEY="s" * 20 + "K3y!-not-a-real-secret-but-long-enough-0123456789",
        DJANGO_ALLOWED_HOSTS="malaria.example.org",
    )
    env.update(overrides)
    return env


def test_check_deploy_is_clean_with_production_settings():
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=production_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_refuses_to_start_without_a_secret_key():
    env = production_env()
    del env["DJANGO_SECRET_KEY"]
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "DJANGO_SECRET_KEY" in result.stderr


@pytest.mark.django_db
def test_downloads_hand_off_to_nginx_after_the_ownership_check(settings, user, other_user):
    settings.PROTECTED_MEDIA_ACCEL_PREFIX = "/protected/"
    analysis = create_analysis(owner=user, upload=upload())
    url = f"/analyses/{analysis.pk}/image/"
    owner, stranger = Client(), Client()
    owner.login(username=user.username, password=PASSWORD)
    stranger.login(username=other_user.username, password=PASSWORD)
    response = owner.get(url)
    assert response.status_code == 200 and response.content == b""
    assert response["X-Accel-Redirect"] == f"/protected/{analysis.image.name}"
    assert stranger.get(url).status_code == 404
