"""The production shape (Dockerfile, docker-compose.yml, deploy/), checked as far as a machine without a
Docker engine allows.

No image is built and no container started here. What is checked instead:

* the compose file's structure: services, health checks, named volumes, start order, scaling;
* that every variable the compose file and .env.example name is one the settings (or gunicorn) read,
  and the settings the app containers would get from `.env` plus the compose `environment:` block;
* `manage.py check --deploy` with production variables, and the refusal to start without a secret key;
* the X-Accel-Redirect hand-off, in-process and, where an `nginx` binary is installed, through the
  real deploy/nginx.conf in front of a Django server and of gunicorn run with deploy/gunicorn.conf.py;
* .dockerignore, read as Docker reads it, against what the Dockerfile copies.
"""

import ast
import contextlib
import getpass
import http.client
import json
import logging
import os
import pickle
import re
import runpy
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from django.conf import settings as django_settings
from django.test import Client

from diagnosis.services import create_analysis
from tests.conftest import ROOT, free_port
from tests.factories import upload

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = ("migrate", "web", "worker", "beat")
LONG_RUNNING = ("db", "redis", "web", "worker", "beat", "nginx")
NGINX_CONF = (ROOT / "deploy" / "nginx.conf").read_text()
GUNICORN_CONF = ROOT / "deploy" / "gunicorn.conf.py"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
ENV_EXAMPLE = (ROOT / ".env.example").read_text()
SETTINGS_SOURCE = (ROOT / "malaria_site" / "settings.py").read_text()

SECRET_KEY_60 = (string.ascii_letters + string.digits)[:60]
PRODUCTION_HOST = "malaria.example.org"


# --- Reading the files ------------------------------------------------------------------------


def settings_env_calls() -> dict[str, ast.Call]:
    """`env("NAME", ...)` / `env.int("NAME", ...)` / `env_flag("NAME", ...)` / `env_path("NAME", ...)` /
    `api_rate("NAME", ...)` calls in settings.py, by variable name."""
    calls = {}
    for node in ast.walk(ast.parse(SETTINGS_SOURCE)):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
            continue
        func = node.func
        is_env = (isinstance(func, ast.Name) and func.id in ("env", "env_flag", "env_path", "api_rate")) or (
            isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "env"
        )
        if is_env and isinstance(node.args[0].value, str):
            calls[node.args[0].value] = node
    return calls


SETTINGS_VARS = set(settings_env_calls())


def env_example_names() -> tuple[set[str], set[str]]:
    """Names in .env.example, set or commented out (`# NAME=value`, an optional one): (application
    settings, the `docker compose only` section)."""
    app, compose_only = set(), set()
    section = app
    for line in ENV_EXAMPLE.splitlines():
        if re.match(r"#\s*---\s*docker compose only", line):
            section = compose_only
        if match := re.match(r"#?\s*([A-Z][A-Z0-9_]*)=", line):
            section.add(match.group(1))
    return app, compose_only


def dotenv_as_compose_reads_it(text: str) -> dict[str, str]:
    """Docker Compose's reading of an env file (compose-go's dotenv parser): the value is trimmed on
    the left, then an unquoted value is cut at the first ` #`. So `KEY=   # note` gives `# note`."""
    values = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        value = value.lstrip(" \t")
        quoted = value[:1] in ("'", '"')
        values[name.strip()] = value[1 : value.index(value[0], 1)] if quoted else value.split(" #", 1)[0].rstrip()
    return values


def dotenv_as_intended(text: str) -> dict[str, str]:
    """.env.example read the way its comments mean it: `KEY=   # note` is an empty value."""
    values = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = re.split(r"(?:^|\s)#", value, maxsplit=1)[0].strip()
    return values


INTERPOLATION = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<named>\w+))")


def interpolate(value, variables: dict[str, str]):
    """Compose's variable interpolation: $$, $NAME, ${NAME}, ${NAME:-default}, ${NAME:?error} (and without `:`)."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name, op = match["braced"] or match["named"], match["op"] or ""
        current = variables.get(name)
        unset = current is None or (current == "" and op.startswith(":"))
        if op.endswith("-"):
            return match["arg"] if unset else current
        if op.endswith("?") and unset:
            raise KeyError(f"{name}: {match['arg']}")
        return current or ""

    return INTERPOLATION.sub(replace, value)


def interpolated_names(value) -> set[str]:
    """Variables the compose file itself interpolates (not `$$NAME`, which the container's shell expands)."""
    if isinstance(value, dict):
        return set().union(*(interpolated_names(item) for item in value.values()), set())
    if isinstance(value, list):
        return set().union(*(interpolated_names(item) for item in value), set())
    if not isinstance(value, str):
        return set()
    return {m["braced"] or m["named"] for m in INTERPOLATION.finditer(value) if not m["escaped"]}


def dockerfile_instructions() -> list[list[str]]:
    """[instruction, arguments] for each instruction, continuation lines joined."""
    return [line.split(None, 1) for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines() if line[:1].isalpha()]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for op, arg in dockerfile_instructions():
        if op == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(arg))
    return env


def dockerfile_args() -> dict[str, str]:
    """The Dockerfile's build arguments and their defaults."""
    args = (arg.split("=", 1) for op, arg in dockerfile_instructions() if op == "ARG")
    return {name: "".join(shlex.split(default)) for name, default in args}


def dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker matches it: `**` spans folders, `*` and `?` stay within one."""
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    tokens = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
    return re.compile("".join(wildcards.get(token, re.escape(token)) for token in tokens))


def dockerignored(path: str) -> bool:
    """Whether the build context leaves `path` out: the last pattern that matches it, or a folder
    above it, decides; a `!` pattern takes it back in."""
    lines = (line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines())
    patterns = [line for line in lines if line and not line.startswith("#")]
    folders = [Path(path), *Path(path).parents][:-1]  # without "."
    excluded = False
    for pattern in patterns:
        if any(dockerignore_regex(pattern.removeprefix("!")).fullmatch(folder.as_posix()) for folder in folders):
            excluded = not pattern.startswith("!")
    return excluded


def container_environment(service: str, dotenv: dict[str, str]) -> dict[str, str]:
    """What a container of `service` would see: image ENV, then env_file .env, then `environment:`."""
    spec = SERVICES[service]
    assert spec["env_file"] == ".env"
    return {**dockerfile_env(), **dotenv, **{k: str(v) for k, v in interpolate(spec["environment"], dotenv).items()}}


def mounts(service: str) -> dict[str, tuple[str, str]]:
    """Volume mounts of a service: target -> (source, mode)."""
    result = {}
    for entry in SERVICES[service].get("volumes", []):
        source, target, *mode = entry.split(":")
        result[target] = (source, mode[0] if mode else "rw")
    return result


def nginx_locations(conf: str = NGINX_CONF) -> dict[str, str]:
    return {m.group(2): m.group(3) for m in re.finditer(r"location\s+(=\s*)?(\S+)\s*\{([^}]*)\}", conf)}


def nginx_site(dotenv: dict[str, str]) -> str:
    """deploy/nginx.conf as the nginx image writes it from its template at start: envsubst over the
    variables of the service's environment that NGINX_ENVSUBST_FILTER lets through, `$NAME` and
    `${NAME}` of those only."""
    env = interpolate(SERVICES["nginx"]["environment"], dotenv)
    values = {name: value for name, value in env.items() if re.search(env["NGINX_ENVSUBST_FILTER"], name)}
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: values.get(m[1] or m[2], m[0]), NGINX_CONF)


def nginx_directive(site: str, name: str) -> str:
    (value,) = re.findall(rf"^\s*{name}\s+(\S+);", site, re.M)
    return value


def size_in_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()
    return int(number) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit.lower()]


def duration_seconds(value: str) -> int:
    """A duration as nginx and compose write it ("1m30s", "340s"; nginx also takes a bare number)."""
    parts = re.findall(r"(\d+)([hms]?)", value)
    assert "".join(number + unit for number, unit in parts) == value, value
    return sum(int(number) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit] for number, unit in parts)


def settings_default(name: str):
    """The default the settings give `name` when the environment does not set it."""
    (default,) = [kw.value for kw in settings_env_calls()[name].keywords if kw.arg == "default"]
    names = {"BASE_DIR": ROOT, "VAR_DIR": ROOT / "var", "str": str}
    return eval(compile(ast.Expression(default), "settings.py", "eval"), names)  # noqa: S307 - the project's own source


def run_python(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the project's Python with only `env` (plus PATH/HOME), not the developer's environment."""
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=timeout
    )


def production_env(**overrides: str) -> dict[str, str]:
    return {
        "DJANGO_SETTINGS_MODULE": "malaria_site.settings",
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": SECRET_KEY_60,
        "DJANGO_ALLOWED_HOSTS": "example.org",
        **overrides,
    }


local_dotenv_sets_secret = pytest.mark.skipif(
    "DJANGO_SECRET_KEY" in dotenv_as_intended((ROOT / ".env").read_text()) if (ROOT / ".env").exists() else False,
    reason="a local .env sets DJANGO_SECRET_KEY, and settings.py reads it",
)


# --- The compose file ---------------------------------------------------------------------------


def test_every_service_is_there_and_long_running_ones_have_health_checks():
    assert set(SERVICES) == set(LONG_RUNNING) | {"migrate"}
    for name in LONG_RUNNING:
        assert SERVICES[name]["healthcheck"]["test"], name
        assert SERVICES[name]["restart"] == "unless-stopped", name
    assert SERVICES["db"]["image"] == "postgres:16"
    assert SERVICES["redis"]["image"] == "redis:7"
    assert SERVICES["nginx"]["image"] == "nginx:1.27"
    assert "pg_isready" in " ".join(SERVICES["db"]["healthcheck"]["test"])
    assert SERVICES["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert "/healthz" in " ".join(SERVICES["web"]["healthcheck"]["test"])
    # One image, built once from this repository, runs every Python service.
    assert {SERVICES[name]["build"]["context"] for name in APP_SERVICES} == {"."}
    assert len({SERVICES[name]["image"] for name in APP_SERVICES}) == 1


def test_a_blank_model_weights_is_the_shipped_model_as_compose_reads_it():
    """`MODEL_WEIGHTS=` (the example's line uncommented to go back to the shipped model) was read
    as the current folder: every cell failed, while ml.evaluate reported the shipped model."""
    shown = run_python(["-c", "from django.conf import settings; print(settings.MODEL_WEIGHTS)"],
                       {"DJANGO_SETTINGS_MODULE": "malaria_site.settings", "MODEL_WEIGHTS": " "})  # fmt: skip
    assert shown.returncode == 0 and shown.stdout.strip() == str(ROOT / "ml" / "weights" / "malaria_vgg19.safetensors")


def test_only_web_shares_a_network_with_nginx_and_the_app_gains_no_privilege():
    """Every service was on compose's one default network: nginx, facing the visitors, could reach
    PostgreSQL and a Redis without a password."""
    networks = {name: set(service["networks"]) for name, service in SERVICES.items()}
    assert {name for name, joined in networks.items() if networks["nginx"] & joined} == {"nginx", "web"}
    assert all("back" in networks[name] for name in (*APP_SERVICES, "db", "redis"))
    for name in APP_SERVICES:
        assert SERVICES[name]["cap_drop"] == ["ALL"] and "no-new-privileges:true" in SERVICES[name]["security_opt"]


def test_compose_builds_with_the_dockerfiles_arguments_and_defaults():
    """`docker compose up -d --build` takes no `--build-arg`: .env sets them, and a blank line there must
    not turn the weights check off (an empty REQUIRE_WEIGHTS is not 1)."""
    cpu = "https://download.pytorch.org/whl/cpu"
    for name in APP_SERVICES:
        args = SERVICES[name]["build"]["args"]
        assert interpolate(args, {}) == dockerfile_args() == {"TORCH_INDEX_URL": "", "REQUIRE_WEIGHTS": "1"}
        assert interpolate(args, {"REQUIRE_WEIGHTS": ""}) == dockerfile_args()
        set_in_dotenv = {"TORCH_INDEX_URL": cpu, "REQUIRE_WEIGHTS": "0"}
        assert interpolate(args, set_in_dotenv) == set_in_dotenv


def test_migrate_is_one_shot():
    migrate = SERVICES["migrate"]
    assert migrate["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert migrate["restart"] == "no" and "healthcheck" not in migrate


def test_data_lives_in_named_volumes():
    declared = set(COMPOSE["volumes"])
    for name in SERVICES:
        for target, (source, _) in mounts(name).items():
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} mounts undeclared volume {source} at {target}"
    assert mounts("db")["/var/lib/postgresql/data"] == ("pgdata", "rw")
    assert mounts("redis")["/data"] == ("redisdata", "rw")
    media_root = SERVICES["web"]["environment"]["MEDIA_ROOT"]
    for name in ("web", "worker"):
        assert mounts(name)[media_root] == ("media", "rw"), name
    assert mounts("nginx")[media_root] == ("media", "ro")
    # Static files: web publishes them into the `static` volume, nginx serves it read-only.
    assert [source for source, _ in mounts("web").values()].count("static") == 1
    assert mounts("nginx")[SERVICES["web"]["environment"]["STATIC_ROOT"]] == ("static", "ro")


def test_start_order_waits_for_health_and_migrations():
    web = SERVICES["web"]["depends_on"]
    assert web["db"]["condition"] == "service_healthy"
    assert web["redis"]["condition"] == "service_healthy"
    assert web["migrate"]["condition"] == "service_completed_successfully"
    assert SERVICES["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    for name in ("worker", "beat"):
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert SERVICES["nginx"]["depends_on"]["web"]["condition"] == "service_healthy"


def test_workers_scale_and_only_nginx_is_published():
    worker = SERVICES["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["command"][:4] == ["celery", "-A", "malaria_site", "worker"]
    # Compose turns `$$` into `$`; the container's shell then names this replica's own node.
    ping = interpolate(worker["healthcheck"]["test"], {})
    assert "inspect ping -d celery@$HOSTNAME" in " ".join(ping)
    assert [name for name, spec in SERVICES.items() if "ports" in spec] == ["nginx"]
    assert not any("container_name" in spec for spec in SERVICES.values())


def test_a_stopped_worker_may_finish_the_longest_task():
    """Docker kills a worker that has not stopped after stop_grace_period: it must outlast the task's
    hard time limit (CELERY_TASK_SOFT_TIME_LIMIT + 30 s), by default and as .env.example sets both."""
    example = dotenv_as_intended(ENV_EXAMPLE)
    grace = SERVICES["worker"]["stop_grace_period"]
    assert interpolate(grace, {}) == interpolate(grace, {"WORKER_STOP_GRACE": ""}) == example["WORKER_STOP_GRACE"]
    soft_limit = settings_default("CELERY_TASK_SOFT_TIME_LIMIT")
    assert soft_limit == int(example["CELERY_TASK_SOFT_TIME_LIMIT"])
    margin = django_settings.CELERY_TASK_TIME_LIMIT - django_settings.CELERY_TASK_SOFT_TIME_LIMIT
    assert duration_seconds(interpolate(grace, {})) > soft_limit + margin
    assert interpolate(grace, {"WORKER_STOP_GRACE": "15m"}) == "15m"


def test_a_stopped_web_container_may_finish_its_requests():
    """A redeploy stops gunicorn, which lets each request under way run to its timeout; Docker kills
    the container after stop_grace_period (10 s by default), cutting uploads and exports off."""
    example = dotenv_as_intended(ENV_EXAMPLE)
    grace = SERVICES["web"]["stop_grace_period"]
    assert interpolate(grace, {}) == interpolate(grace, {"WEB_STOP_GRACE": ""}) == example["WEB_STOP_GRACE"]
    gunicorn = runpy.run_path(str(GUNICORN_CONF))
    assert gunicorn["graceful_timeout"] == gunicorn["timeout"] == int(example["GUNICORN_TIMEOUT"])
    assert duration_seconds(interpolate(grace, {})) > gunicorn["graceful_timeout"]


def test_housekeeping_has_a_queue_every_worker_also_takes_from():
    """So the sweeper, the callbacks and the deletions are not stuck behind a backlog of cells: a
    worker started without -Q (compose, scripts/start, the tests) consumes every queue listed."""
    from malaria_site.celery import app

    consumed = {queue.name for queue in app.conf.task_queues}
    housekeeping = {
        "deliver_batch_callback",
        "requeue_stale_analyses",
        "delete_expired_analyses",
        "delete_orphaned_files",
    }
    for name in housekeeping | {"analyse_images"}:
        queue = app.amqp.router.route({}, f"diagnosis.tasks.{name}")["queue"].name
        assert queue in consumed
        assert (queue != app.conf.task_default_queue) == (name in housekeeping), name
    assert consumed == {"tests", "tests-housekeeping"}  # apart from a platform on the same broker
    assert not {"-Q", "--queues"} & set(SERVICES["worker"]["command"])
    assert "-Q" not in (ROOT / "scripts" / "start").read_text()


def test_beat_runs_the_stale_analysis_sweeper(settings):
    from diagnosis import tasks

    beat = SERVICES["beat"]
    assert beat["command"][:4] == ["celery", "-A", "malaria_site", "beat"]
    assert "deploy" not in beat  # exactly one scheduler
    assert "diagnosis.tasks.requeue_stale_analyses" in {e["task"] for e in settings.CELERY_BEAT_SCHEDULE.values()}
    assert hasattr(tasks, "requeue_stale_analyses")
    # LOG_LEVEL (.env) sets the worker's and beat's level as it sets the web's.
    for service in ("worker", "beat"):
        command = interpolate(SERVICES[service]["command"], {"LOG_LEVEL": "WARNING"})
        assert command[command.index("--loglevel") + 1] == "WARNING", service


def test_beat_keeps_its_schedule_under_var_dir_and_compose_names_its_own(tmp_path):
    """scripts/start passed --schedule var/celerybeat-schedule: with VAR_DIR elsewhere the schedule
    stayed in the checkout, shared by every platform started from it."""
    show = "from malaria_site.celery import app; print(app.conf.beat_schedule_filename)"
    shown = run_python(["-c", show], {**production_env(), "VAR_DIR": str(tmp_path)})
    assert shown.stdout.strip() == str(tmp_path / "celerybeat-schedule"), shown.stderr
    assert "--schedule" not in (ROOT / "scripts" / "start").read_text()
    assert SERVICES["beat"]["command"][-2:] == ["--schedule", "/tmp/celerybeat-schedule"]  # the health check's


def test_scripts_start_runs_beat_as_a_process_of_its_own_that_it_waits_on():
    """Beat run inside the worker (--beat) could be killed without a sign: the worker logged nothing,
    the sweeper stopped, and cells whose broker message was lost stayed queued. Its own process,
    in the list `wait -n` watches, ends the platform with it instead."""
    start = (ROOT / "scripts" / "start").read_text()
    assert not re.search(r"^celery .* --beat", start, re.MULTILINE)
    assert re.search(r"^celery -A malaria_site beat .*&$", start, re.MULTILINE)
    assert re.search(r'^wait -n .*"\$beat"', start, re.MULTILINE)


def test_beat_health_check_notices_a_stalled_scheduler(tmp_path):
    command = SERVICES["beat"]["healthcheck"]["test"]
    assert command[:3] == ["CMD", "python", "-c"]
    schedule = tmp_path / "celerybeat-schedule"
    assert command[3].count("/tmp/celerybeat-schedule") == 1
    code = command[3].replace("/tmp/celerybeat-schedule", str(schedule))

    def healthy() -> bool:
        return run_python(["-c", code], {}).returncode == 0

    assert not healthy()  # beat never saved a schedule
    schedule.with_suffix(".db").write_bytes(b"")  # dbm may add a suffix
    assert healthy()
    two_hours_ago = time.time() - 7200
    os.utime(schedule.with_suffix(".db"), (two_hours_ago, two_hours_ago))
    assert not healthy()


def test_web_runs_gunicorn_on_the_port_nginx_proxies_to():
    command = " ".join(SERVICES["web"]["command"])
    assert "exec gunicorn --config deploy/gunicorn.conf.py --bind 0.0.0.0:8000 --forwarded-allow-ips '*'" in command
    config = runpy.run_path(str(GUNICORN_CONF))
    # Outside compose, where nothing keeps other machines away from the port: this one only, and
    # forwarded headers from a proxy on it only (gunicorn's own default).
    assert config["bind"] == "127.0.0.1:8000" and "forwarded_allow_ips" not in config
    assert config["accesslog"] == "-" and config["errorlog"] == "-"
    assert re.search(r"^\s*set \$web web:8000;", nginx_locations()["/"], re.M)
    assert "http://127.0.0.1:8000/healthz" in " ".join(SERVICES["web"]["healthcheck"]["test"])


def test_gunicorn_workers_and_timeout_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("GUNICORN_WORKERS", "5")
    monkeypatch.setenv("GUNICORN_TIMEOUT", "90")
    config = runpy.run_path(str(GUNICORN_CONF))
    assert (config["workers"], config["timeout"]) == (5, 90)
    monkeypatch.setenv("GUNICORN_WORKERS", "")  # a blank line in .env
    assert runpy.run_path(str(GUNICORN_CONF))["workers"] == 3


# --- nginx.conf against the compose file and the settings -------------------------------------------


def test_protected_location_is_internal_and_matches_the_app():
    app_env = SERVICES["web"]["environment"]
    prefix = app_env["PROTECTED_MEDIA_ACCEL_PREFIX"]
    assert prefix.startswith("/") and prefix.endswith("/")
    locations = nginx_locations()
    protected = locations[prefix]
    assert re.search(r"^\s*internal;", protected, re.M)
    assert re.search(rf"^\s*alias {re.escape(app_env['MEDIA_ROOT'])}/;", protected, re.M)
    assert mounts("nginx")[app_env["MEDIA_ROOT"]] == ("media", "ro")
    # No other location exposes the media folder.
    for path, block in locations.items():
        if path != prefix:
            assert app_env["MEDIA_ROOT"] not in block, path


def test_static_location_matches_static_url_and_root():
    static = nginx_locations()["/" + django_settings.STATIC_URL.strip("/") + "/"]
    assert re.search(rf"alias {re.escape(SERVICES['web']['environment']['STATIC_ROOT'])}/;", static)


def test_nginx_body_limit_and_timeout_follow_the_app(monkeypatch):
    """nginx refuses bodies over REQUEST_MAX_BYTES, and waits a minute longer than gunicorn's timeout."""
    example = dotenv_as_intended(ENV_EXAMPLE)
    monkeypatch.delenv("GUNICORN_TIMEOUT", raising=False)
    gunicorn_default = runpy.run_path(str(GUNICORN_CONF))["timeout"]
    assert gunicorn_default == int(example["GUNICORN_TIMEOUT"])
    for site in (nginx_site({}), nginx_site(example)):
        limit = size_in_bytes(nginx_directive(site, "client_max_body_size"))
        assert limit == settings_default("REQUEST_MAX_BYTES") == int(example["REQUEST_MAX_BYTES"])
        assert duration_seconds(nginx_directive(site, "proxy_read_timeout")) == gunicorn_default + 60
    changed = nginx_site({"REQUEST_MAX_BYTES": "1048576", "GUNICORN_TIMEOUT": "90"})
    assert nginx_directive(changed, "client_max_body_size") == "1048576"
    assert duration_seconds(nginx_directive(changed, "proxy_read_timeout")) == 150
    # Only those two are filled in: nginx's own variables ($remote_addr, $uri, ...) stay as they are,
    # and so would one that happened to share a name with the image's environment.
    placeholders = {"${REQUEST_MAX_BYTES}": "1048576", "${GUNICORN_TIMEOUT}": "90"}
    assert changed == re.sub(r"\$\{\w+\}", lambda m: placeholders[m[0]], NGINX_CONF)
    env = interpolate(SERVICES["nginx"]["environment"], {})
    candidates = [*env, "HOSTNAME", "HOME", "PATH", "NGINX_VERSION"]
    let_through = {name for name in candidates if re.search(env["NGINX_ENVSUBST_FILTER"], name)}
    assert let_through == {"REQUEST_MAX_BYTES", "GUNICORN_TIMEOUT"}
    assert mounts("nginx")["/etc/nginx/templates/default.conf.template"] == ("./deploy/nginx.conf", "ro")


@pytest.mark.skipif(shutil.which("envsubst") is None, reason="no envsubst here (gettext-base)")
def test_nginx_site_is_what_envsubst_writes():
    """The rendering the other tests use, against the envsubst the nginx image runs, given the names it lists."""
    dotenv = {"REQUEST_MAX_BYTES": "1048576", "GUNICORN_TIMEOUT": "90"}
    env = interpolate(SERVICES["nginx"]["environment"], dotenv)
    listed = " ".join(f"${{{name}}}" for name in env if re.search(env["NGINX_ENVSUBST_FILTER"], name))
    base = {k: os.environ[k] for k in ("PATH",) if k in os.environ}
    result = subprocess.run(
        ["envsubst", listed], input=NGINX_CONF, env={**base, **env}, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == nginx_site(dotenv)


def test_nginx_forwards_scheme_host_and_address():
    proxy = nginx_locations()["/"]
    assert "proxy_pass http://$web;" in proxy
    assert re.search(r"proxy_set_header X-Forwarded-Proto \$\w+;", proxy)
    assert "proxy_set_header Host $http_host;" in proxy  # with the port, as the browser's Origin has it
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in proxy  # replaced, not appended to
    assert django_settings.SECURE_PROXY_SSL_HEADER == ("HTTP_X_FORWARDED_PROTO", "https")
    for header in ("X-Content-Type-Options", "Content-Security-Policy", "X-Frame-Options"):
        assert f"add_header {header}" in nginx_locations()["/protected/"], header


# --- Environment variables -----------------------------------------------------------------------


def test_app_environment_names_are_ones_the_settings_read():
    _, compose_only = env_example_names()
    for name in APP_SERVICES:
        unknown = set(SERVICES[name]["environment"]) - SETTINGS_VARS
        assert not unknown, f"{name} sets variables settings.py never reads: {unknown}"
    assert all(name.startswith("POSTGRES_") for name in SERVICES["db"]["environment"])
    # Variables compose itself substitutes: the settings', the postgres image's, or the documented compose-only ones.
    unknown = {n for n in interpolated_names(COMPOSE) - SETTINGS_VARS - compose_only if not n.startswith("POSTGRES_")}
    assert not unknown, f"docker-compose.yml uses variables nothing documents: {unknown}"
    assert len({json.dumps(SERVICES[name]["environment"], sort_keys=True) for name in APP_SERVICES}) == 1


def test_env_example_documents_exactly_what_the_settings_read():
    app, compose_only = env_example_names()
    assert not SETTINGS_VARS - app, f"document these in .env.example: {SETTINGS_VARS - app}"
    assert not app - SETTINGS_VARS, f".env.example lists variables settings.py never reads: {app - SETTINGS_VARS}"
    # The compose-only section is for the compose file (interpolation) and gunicorn.conf.py.
    gunicorn_vars = set(re.findall(r"os\.environ\.get\(\"(\w+)\"", GUNICORN_CONF.read_text()))
    unused = compose_only - interpolated_names(COMPOSE) - gunicorn_vars
    assert not unused, f".env.example's compose section lists variables nothing uses: {unused}"


def test_a_copy_of_env_example_changes_no_setting_but_the_secret_key_placeholder():
    """The README's way to PostgreSQL and Redis starts with `cp .env.example .env`: every value the
    example sets must be the development default (its DJANGO_ALLOWED_HOSTS once left out [::1])."""
    probe = (
        "import json, environ; environ.Env.read_env = staticmethod(lambda *a, **k: None);"
        "import malaria_site.settings as s;"
        "print(json.dumps({k: repr(v) for k, v in vars(s).items() if k.isupper()}))"
    )

    def settings_under(variables: dict[str, str]) -> dict[str, str]:
        base = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
        result = subprocess.run(
            [sys.executable, "-c", probe], env=base | variables, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    defaults, copied = settings_under({}), settings_under(dotenv_as_intended(ENV_EXAMPLE))
    changed = sorted(name for name in defaults.keys() | copied.keys() if defaults.get(name) != copied.get(name))
    assert changed == ["SECRET_KEY"]


def test_compose_requires_the_secrets():
    with pytest.raises(KeyError, match="DJANGO_SECRET_KEY"):
        container_environment("web", {"POSTGRES_PASSWORD": "x"})
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        container_environment("web", {"DJANGO_SECRET_KEY": "x"})
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(SERVICES["db"]["environment"], {"POSTGRES_PASSWORD": ""})


def compose_settings(dotenv: dict[str, str]) -> tuple[dict, dict[str, str]]:
    env = container_environment("web", dotenv)
    code = (
        "import json; from django.conf import settings as s; print(json.dumps({"
        "'DEBUG': s.DEBUG, 'DB': s.DATABASES['default']['ENGINE'], 'DB_HOST': s.DATABASES['default']['HOST'], "
        "'CACHE': s.CACHES['default']['BACKEND'], 'BROKER': s.CELERY_BROKER_URL, 'MEDIA_ROOT': str(s.MEDIA_ROOT), "
        "'STATIC_ROOT': str(s.STATIC_ROOT), 'ACCEL': s.PROTECTED_MEDIA_ACCEL_PREFIX, 'WEIGHTS': str(s.MODEL_WEIGHTS), "
        "'SSL_REDIRECT': s.SECURE_SSL_REDIRECT, 'SECURE_COOKIES': s.SESSION_COOKIE_SECURE, "
        "'HSTS': s.SECURE_HSTS_SECONDS, 'HOSTS': s.ALLOWED_HOSTS}))"
    )
    result = run_python(["-c", code], {**env, "DJANGO_SETTINGS_MODULE": "malaria_site.settings"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), env


@local_dotenv_sets_secret
def test_the_app_containers_get_production_settings():
    """`cp .env.example .env`, set the secrets and the host name: what web, worker and beat then run with."""
    dotenv = {
        **dotenv_as_intended(ENV_EXAMPLE),
        "DJANGO_SECRET_KEY": SECRET_KEY_60,
        "DJANGO_ALLOWED_HOSTS": PRODUCTION_HOST,
        "POSTGRES_PASSWORD": "Zt8vQ2pL9xR4",
    }
    values, env = compose_settings(dotenv)
    image_weights = "/app/" + str(Path(settings_default("MODEL_WEIGHTS")).relative_to(ROOT))
    assert values == {
        "DEBUG": False,
        "DB": "django.db.backends.postgresql",
        "DB_HOST": "db",
        "CACHE": "malaria_site.cache.FallbackRedisCache",
        "BROKER": "redis://redis:6379/0",
        "MEDIA_ROOT": "/data/media",
        "STATIC_ROOT": "/data/static",
        "ACCEL": "/protected/",
        "WEIGHTS": image_weights,
        "SSL_REDIRECT": True,
        "SECURE_COOKIES": True,
        "HSTS": 31536000,
        "HOSTS": [PRODUCTION_HOST],
    }
    assert re.search(r"^WORKDIR /app$", DOCKERFILE, re.M)  # where image_weights lives
    check = run_python(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], env)
    assert check.returncode == 0, check.stdout + check.stderr


def compose_command() -> list[str] | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
            return ["docker", "compose"]
    return [shutil.which("docker-compose")] if shutil.which("docker-compose") else None


@pytest.mark.skipif(compose_command() is None, reason="neither `docker compose` nor `docker-compose` is installed")
def test_docker_compose_itself_accepts_the_file(tmp_path):
    """`docker compose config` (needs no engine): the schema, the interpolation and the secrets check."""
    shutil.copy(ROOT / "docker-compose.yml", tmp_path)
    dotenv = {"DJANGO_SECRET_KEY": SECRET_KEY_60, "POSTGRES_PASSWORD": "Zt8vQ2pL9xR4", "DJANGO_HSTS_SECONDS": ""}
    (tmp_path / ".env").write_text("".join(f"{name}={value}\n" for name, value in dotenv.items()))

    def config() -> subprocess.CompletedProcess:
        documented = SETTINGS_VARS | env_example_names()[1]  # what the developer's own shell may set
        env = {k: v for k, v in os.environ.items() if k not in documented and not k.startswith("POSTGRES_")}
        return subprocess.run([*compose_command(), "config"], cwd=tmp_path, env=env, capture_output=True, text=True)

    result = config()
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    assert set(resolved) == set(SERVICES)
    for name in APP_SERVICES:  # compose's own result matches the emulation the other tests rely on
        expected = container_environment(name, dotenv)
        assert {k: str(v) for k, v in resolved[name]["environment"].items()} == {
            k: v for k, v in expected.items() if k in resolved[name]["environment"]
        }
        assert set(resolved[name]["environment"]) == set(SERVICES[name]["environment"]) | set(dotenv)
        assert resolved[name]["build"]["args"] == interpolate(SERVICES[name]["build"]["args"], dotenv)
    for name in ("REQUEST_MAX_BYTES", "GUNICORN_TIMEOUT"):  # what nginx fills into its template
        assert str(resolved["nginx"]["environment"][name]) == interpolate(SERVICES["nginx"]["environment"][name], {})
    assert duration_seconds(resolved["worker"]["stop_grace_period"]) == 340
    (tmp_path / ".env").write_text("POSTGRES_PASSWORD=x\nDJANGO_SECRET_KEY=\n")
    refused = config()
    assert refused.returncode != 0 and "set DJANGO_SECRET_KEY in .env" in refused.stderr


def test_env_example_copied_to_env_has_no_comment_text_in_values(tmp_path):
    import environ

    class Captured(environ.Env):
        ENVIRON: dict[str, str] = {}  # read_env fills this instead of os.environ

    (tmp_path / ".env").write_text(ENV_EXAMPLE)
    Captured.read_env(tmp_path / ".env")  # what settings.py does with a .env copied from the example
    as_compose, as_django = dotenv_as_compose_reads_it(ENV_EXAMPLE), Captured.ENVIRON
    polluted = {n: v for parsed in (as_compose, as_django) for n, v in parsed.items() if "#" in v or v != v.strip()}
    assert not polluted


# --- Production settings ---------------------------------------------------------------------------


@local_dotenv_sets_secret
def test_check_deploy_is_clean_with_production_settings():
    result = run_python(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], production_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout
    assert "WARNINGS" not in result.stdout + result.stderr


@local_dotenv_sets_secret
def test_production_refuses_to_start_without_a_secret_key():
    env = production_env()
    del env["DJANGO_SECRET_KEY"]
    result = run_python(["-c", "import malaria_site.settings"], env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and "DJANGO_SECRET_KEY" in result.stderr


# --- Protected media: Django decides, nginx sends ------------------------------------------------------


@pytest.mark.django_db
def test_owner_download_is_handed_to_nginx_and_a_stranger_gets_404(settings, web_client, user, other_user):
    settings.PROTECTED_MEDIA_ACCEL_PREFIX = "/protected/"
    analysis = create_analysis(owner=user, upload=upload())
    stranger, anonymous = Client(), Client()
    stranger.force_login(other_user)
    for url in (f"/analyses/{analysis.pk}/image/", f"/api/analyses/{analysis.pk}/image/"):
        response = web_client.get(url)
        assert response.status_code == 200, url
        assert response["X-Accel-Redirect"] == f"/protected/{analysis.image.name}"
        assert response.content == b""
        assert response["Content-Type"] == "image/png"
        assert stranger.get(url).status_code == 404, url
        assert "X-Accel-Redirect" not in anonymous.get(url), url


# --- The Dockerfile ----------------------------------------------------------------------------------


def test_the_dockerfiles_collectstatic_step_runs_as_written(tmp_path):
    """The image's only manifest of hashed static names comes from this step, under production settings."""
    flat = re.sub(r"\\\n", " ", DOCKERFILE)
    image_env = dict(re.findall(r"(\w+)=(\S+)", re.search(r"^ENV (.*)$", flat, re.M)[1]))
    step = re.search(r"&& ((?:\w+=\S+ )+)\s*python manage.py (collectstatic[^&]*)", flat)
    assert image_env["DJANGO_DEBUG"] == "false" and step, "the Dockerfile collects static files in production mode"
    step_env = dict(assignment.split("=", 1) for assignment in step[1].split())
    env = {**image_env, **step_env, "STATIC_ROOT": str(tmp_path / "static"), "VAR_DIR": str(tmp_path)}
    result = run_python(["manage.py", *shlex.split(step[2])], env, timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "static" / "staticfiles.json").read_text())["paths"]
    assert re.fullmatch(r"css/app\.[0-9a-f]{12}\.css", manifest["css/app.css"])


def test_dockerfile_builds_a_non_root_image_with_everything_the_app_needs():
    instructions = dockerfile_instructions()
    assert instructions[0] == ["FROM", "python:3.11-slim"]
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_run = max(i for i, (op, _) in enumerate(instructions) if op == "RUN")
    assert max(i for i, (op, _) in enumerate(instructions) if op == "USER") > last_run
    assert any(op == "RUN" and "collectstatic" in arg for op, arg in instructions)
    assert any(op == "RUN" and "pip install" in arg and "requirements.txt" in arg for op, arg in instructions)
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE  # the CPU wheel index, documented
    assert instructions[-1][0] == "CMD" and "gunicorn" in instructions[-1][1]
    # `docker run -p 8000:8000` reaches it: the config alone listens on the container's 127.0.0.1.
    assert json.loads(instructions[-1][1])[3:5] == ["--bind", "0.0.0.0:8000"] and "EXPOSE 8000" in DOCKERFILE
    copied = {arg.split()[0].rstrip("/") for op, arg in instructions if op == "COPY"}
    assert "." not in copied, "COPY . . would put .env, var/ and .venv into the image"
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} - {"tests"}
    needed = packages | {"manage.py", "templates", "static", "deploy/gunicorn.conf.py", "requirements.txt"}
    assert needed <= copied, needed - copied
    assert Path(settings_default("MODEL_WEIGHTS")).relative_to(ROOT).parts[0] in copied
    # Every folder a named volume is mounted on exists in the image, so the volume starts out owned by `app`.
    for name in APP_SERVICES:
        for target in mounts(name):
            assert target in DOCKERFILE or target in dockerfile_env().values(), (name, target)


def test_dockerignore_keeps_secrets_and_patient_data_out_and_nothing_the_image_copies():
    sources = [source for op, arg in dockerfile_instructions() if op == "COPY" for source in arg.split()[:-1]]
    assert sources, "the Dockerfile copies nothing?"
    for source in sources:
        path = ROOT / source
        for file in [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]:
            relative = file.relative_to(ROOT)
            # Caches and training checkpoints are all that may be left out of what the image copies.
            droppable = file.suffix in (".pyc", ".ckpt") or "__pycache__" in relative.parts
            assert dockerignored(relative.as_posix()) == droppable, relative
    assert not dockerignored(str(Path(settings_default("MODEL_WEIGHTS")).relative_to(ROOT)))
    for left_out in (
        ".env",
        "var/db.sqlite3",
        "var/media/uploads/cell.png",
        ".venv/bin/python",
        ".git/HEAD",
        "ml/weights/malaria_vgg19.ckpt",
        "malaria_vgg19.ckpt",
        "diagnosis/__pycache__/models.cpython-311.pyc",
    ):
        assert dockerignored(left_out), left_out


# --- nginx and gunicorn for real (where an nginx binary is installed) ------------------------------------------------

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="no nginx binary here (apt-get install nginx-light)")


def test_the_development_servers_log_leaves_query_strings_out(tmp_path):
    """scripts/start serves the site with runserver, whose access log wrote each request line whole:
    a search for a patient, or a sample reference, was in the terminal and the journal."""
    import requests

    port, log = free_port(), tmp_path / "runserver.log"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    command = [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"]
    expected = [
        '"GET /accounts/login/ HTTP/1.1" 200',
        '"GET /batches/ HTTP/1.1" 302',
        "Bad request syntax ('GET /batches/ HTTP/1.1')",
    ]
    server = logged_process(command, env=env, log=log)
    try:
        wait_for_port(port, server, log, timeout=60)
        for path in ("/accounts/login/?next=/%3Fsearch%3DPATIENT-4711", "/batches/?sample_reference=PATIENT-4711"):
            requests.get(f"http://127.0.0.1:{port}{path}", allow_redirects=False, timeout=30)
        # A raw space in the query (a hand-made URL): refused, and quoted in the error as well.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            raw.sendall(b"GET /batches/?sample_reference=Jane Doe HTTP/1.1\r\nHost: x\r\n\r\n")
            raw.recv(65536)
        # Each request's thread logs it once its answer is sent: wait for the lines before stopping it.
        deadline = time.monotonic() + 30
        while not all(line in log.read_text() for line in expected):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        stop(server)
    text = log.read_text()
    assert "Bad request syntax ('GET /batches/ HTTP/1.1')" in text, text
    assert "PATIENT-4711" not in text and "Jane" not in text and "Doe" not in text, text


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited early:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} not open after {timeout}s:\n{log.read_text()[-3000:]}")


def gunicorn_command(port: int) -> list[str]:
    """gunicorn as deploy/gunicorn.conf.py sets it up, on this machine's ``port``."""
    config = ["--config", str(GUNICORN_CONF), "--bind", f"127.0.0.1:{port}"]
    return [sys.executable, "-m", "gunicorn", *config, "malaria_site.wsgi"]


def logged_process(command: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A server started from the repository, its stdout and stderr together in ``log``, in a
    session of its own (``stop`` ends the whole group)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def running_nginx(workdir: Path, *, upstream: str, media: Path, static: Path):
    """deploy/nginx.conf, unchanged but for the addresses and folders, in an nginx of its own."""
    port = free_port()
    site = nginx_site({})  # the compose file's defaults
    for old, new in {
        "listen 80;": f"listen 127.0.0.1:{port};",
        "set $web web:8000;": f"set $web {upstream};",
        "alias /data/media/;": f"alias {media}/;",
        "alias /data/static/;": f"alias {static}/;",
        "access_log /dev/stdout without_query;": f"access_log {workdir}/access.log without_query;",
        "error_log /dev/stderr crit;": f"error_log {workdir}/site-error.log crit;",
    }.items():
        assert site.count(old) == 1, old
        site = site.replace(old, new)
    workdir.mkdir()
    (workdir / "site.conf").write_text(site)
    mime_types = "include /etc/nginx/mime.types;" if Path("/etc/nginx/mime.types").exists() else ""
    temp_kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp_paths = "\n".join(f"{kind}_temp_path {workdir}/{kind};" for kind in temp_kinds)
    (workdir / "nginx.conf").write_text(
        f"""
        {"user " + getpass.getuser() + ";" if os.geteuid() == 0 else ""}
        worker_processes 1;
        pid {workdir}/nginx.pid;
        events {{ worker_connections 64; }}
        http {{
            {mime_types}
            default_type application/octet-stream;
            {temp_paths}
            include {workdir}/site.conf;
        }}
        """
    )
    log = workdir / "error.log"
    command = [NGINX, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", str(log)]
    check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen([*command, "-g", "daemon off;"], stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, process, log)
        yield port
    finally:
        stop(process)


def logged_once(log: Path, line: str, timeout: float = 10) -> str:
    """The access log once it holds `line`: nginx writes a request's entry after the client has its response."""
    deadline = time.monotonic() + timeout
    while line not in (logged := log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert line in logged, logged
    return logged


def request(port: int, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        response.body = response.read()
        return response
    finally:
        connection.close()


@needs_nginx
def test_nginx_serves_patient_images_only_after_djangos_check(
    transactional_db, live_server, settings, user, other_user, media_root, tmp_path, monkeypatch
):
    monkeypatch.setattr("diagnosis.services.enqueue_analyses", lambda **kwargs: None)  # no broker traffic
    settings.PROTECTED_MEDIA_ACCEL_PREFIX = SERVICES["web"]["environment"]["PROTECTED_MEDIA_ACCEL_PREFIX"]
    analysis = create_analysis(owner=user, upload=upload())
    image_bytes = Path(media_root, analysis.image.name).read_bytes()
    static = tmp_path / "static"
    (static / "css").mkdir(parents=True)
    (static / "css" / "site.css").write_text("body { color: black }")

    def cookie_for(account) -> dict:
        client = Client()
        client.force_login(account)
        return {"Cookie": f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"}

    owner, stranger = cookie_for(user), cookie_for(other_user)
    upstream = f"127.0.0.1:{live_server.url.rsplit(':', 1)[1]}"  # an address: nginx resolves names at run time
    with running_nginx(tmp_path / "nginx", upstream=upstream, media=Path(media_root), static=static) as port:
        host = {"Host": "localhost"}
        for url in (f"/analyses/{analysis.pk}/image/", f"/api/analyses/{analysis.pk}/image/"):
            response = request(port, "GET", url, {**host, **owner})
            assert response.status == 200, (url, response.body[:500])
            assert response.body == image_bytes
            assert response.getheader("X-Accel-Redirect") is None  # nginx consumes it
            assert response.getheader("Content-Type") == "image/png"
            assert response.getheader("Content-Disposition") == f'inline; filename="image-{analysis.pk}.png"'
            assert response.headers.get_all("Cache-Control") == ["private, no-store"]
            assert response.headers.get_all("X-Content-Type-Options") == ["nosniff"]
            assert response.getheader("Content-Security-Policy") == "default-src 'none'; sandbox"
            assert request(port, "GET", url, {**host, **stranger}).status == 404, url
        anonymous = request(port, "GET", f"/analyses/{analysis.pk}/image/", host)
        assert anonymous.status == 302 and not anonymous.body.startswith(image_bytes[:8])
        # The internal location cannot be asked for directly, even by the owner.
        assert request(port, "GET", f"/protected/{analysis.image.name}", {**host, **owner}).status == 404
        traversal = request(port, "GET", f"/static/../{analysis.image.name}", host)
        assert traversal.status != 200 and image_bytes[:16] not in traversal.body

        css = request(port, "GET", "/static/css/site.css", host)
        assert css.status == 200 and css.body == b"body { color: black }"
        assert css.getheader("X-Content-Type-Options") == "nosniff"
        assert request(port, "GET", "/nginx-health", host).body == b"ok\n"

        # Bodies over REQUEST_MAX_BYTES are refused by nginx before they reach gunicorn: with JSON for
        # the API and the upload page's script, with a page for the form sent without JavaScript.
        limit = settings_default("REQUEST_MAX_BYTES")

        def too_big(path: str, **headers: str) -> http.client.HTTPResponse:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.putrequest("POST", path, skip_host=True)
            for name, value in {**host, **owner, "Content-Length": str(limit + 1), **headers}.items():
                connection.putheader(name, value)
            connection.endheaders()
            refused = connection.getresponse()
            refused.body = refused.read()
            connection.close()
            return refused

        page = too_big("/upload/")
        assert page.status == 413 and page.getheader("Content-Type") == "text/html"
        assert f"Nothing was stored: the upload was over the limit of {limit} bytes" in page.body.decode()
        for refused in (too_big("/upload/", **{"X-Requested-With": "XMLHttpRequest"}), too_big("/api/batches/")):
            assert refused.status == 413 and refused.getheader("Content-Type") == "application/json"
            assert json.loads(refused.body) == {"detail": f"The request is too large; the limit is {limit} bytes."}
        # Logged as the requests they were, not as the error page's (GET /too-large).
        logged = logged_once(tmp_path / "nginx" / "access.log", '"POST /api/batches/ HTTP/1.1" 413')
        assert logged.count('"POST /upload/ HTTP/1.1" 413') == 2

        # Queries can carry patient references: the access log keeps only the path.
        request(port, "GET", "/?search=PATIENT-4711&status=done", {**host, **owner})
        logged = logged_once(tmp_path / "nginx" / "access.log", '"GET / HTTP/1.1" 200')
        assert "PATIENT-4711" not in logged


def dead_upstream() -> str:
    with socket.socket() as probe:  # a port nothing listens on: the web service is restarting
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@needs_nginx
def test_nginx_logs_no_query_while_the_web_service_is_down(tmp_path):
    workdir = tmp_path / "nginx"
    with running_nginx(workdir, upstream=dead_upstream(), media=tmp_path, static=tmp_path) as port:
        headers = {"Host": "localhost", "Referer": "http://localhost/?sample_reference=PATIENT-4711"}
        assert request(port, "GET", "/?search=PATIENT-4711", headers).status == 502
        logged_once(workdir / "access.log", '"GET / HTTP/1.1" 502')
    for log in workdir.glob("*.log"):
        assert "PATIENT-4711" not in log.read_text(), log.name


@needs_nginx
def test_the_pages_nginx_writes_itself_carry_the_security_headers(tmp_path):
    """A location's add_header replaces the server's, and only /static/ and /protected/ had any: the
    413 page and JSON and nginx's stock 502 while `web` restarted went out without nosniff,
    X-Frame-Options or a CSP, flagged by every header scan of the site."""
    with running_nginx(tmp_path / "nginx", upstream=dead_upstream(), media=tmp_path, static=tmp_path) as port:
        host = {"Host": "localhost"}
        over_the_limit = {**host, "Content-Length": str(300 * 1024 * 1024)}
        answers = {
            "502": request(port, "GET", "/accounts/login/", host),
            "413 page": request(port, "POST", "/upload/", over_the_limit, b""),
            "413 JSON": request(port, "POST", "/api/batches/", over_the_limit, b""),
        }
    assert [answer.status for answer in answers.values()] == [502, 413, 413]  # nginx's own status kept
    assert "The screening service is not answering" in answers["502"].body.decode()
    for name, answer in answers.items():
        for header in ("X-Content-Type-Options", "X-Frame-Options", "Content-Security-Policy", "Permissions-Policy"):
            assert answer.getheader(header), (name, header)


@needs_nginx
@local_dotenv_sets_secret
def test_gunicorn_behind_nginx_in_production_mode(tmp_path):
    port = free_port()
    env = production_env(
        DJANGO_ALLOWED_HOSTS=PRODUCTION_HOST,
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        CELERY_BROKER_URL="filesystem://",
        CELERY_FILESYSTEM_BROKER_DIR=str(tmp_path / "broker"),
        VAR_DIR=str(tmp_path),
        MEDIA_ROOT=str(tmp_path / "media"),
        STATIC_ROOT=str(tmp_path / "static"),
        PROTECTED_MEDIA_ACCEL_PREFIX="/protected/",
        GUNICORN_WORKERS="1",
    )
    (tmp_path / "media").mkdir()
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    # As the Dockerfile does: production pages need the manifest of hashed static names.
    collect = [sys.executable, "manage.py", "collectstatic", "--noinput", "--verbosity", "0"]
    collected = subprocess.run(collect, cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stderr
    log = tmp_path / "gunicorn.log"
    gunicorn = logged_process(gunicorn_command(port), env={**base, **env}, log=log)
    try:
        wait_for_port(port, gunicorn, log, timeout=60)

        # The web service's own health check command, as the container's shell would run it.
        health = interpolate(SERVICES["web"]["healthcheck"]["test"], {})
        assert health[0] == "CMD-SHELL" and health[1].count("127.0.0.1:8000") == 1
        script = health[1].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        # The Host header (the first DJANGO_ALLOWED_HOSTS entry) is what makes it pass.
        for allowed, healthy in (
            (f"{PRODUCTION_HOST},www.example.org", True),
            (f".{PRODUCTION_HOST}", True),
            ("elsewhere.org", False),
        ):
            result = subprocess.run(["sh", "-c", script], env={**base, "DJANGO_ALLOWED_HOSTS": allowed}, timeout=30)
            assert (result.returncode == 0) == healthy, allowed

        with running_nginx(
            tmp_path / "nginx", upstream=f"127.0.0.1:{port}", media=tmp_path / "media", static=tmp_path / "static"
        ) as nginx_port:
            host = {"Host": PRODUCTION_HOST}
            health = request(nginx_port, "GET", "/healthz", host)
            assert health.status == 200, health.body
            assert json.loads(health.body) == {"status": "ok", "database": "ok", "broker": "ok"}
            # Plain HTTP reaching nginx is sent to HTTPS ...
            plain = request(nginx_port, "GET", "/accounts/login/", host)
            assert plain.status == 301
            assert plain.getheader("Location") == f"https://{PRODUCTION_HOST}/accounts/login/"
            # ... and what the TLS terminator in front forwards as HTTPS is served, with HSTS and secure cookies.
            secure = request(nginx_port, "GET", "/accounts/login/", {**host, "X-Forwarded-Proto": "https"})
            assert secure.status == 200
            assert secure.getheader("Strict-Transport-Security") == "max-age=31536000; includeSubDomains; preload"
            assert secure.headers.get_all("X-Frame-Options") == ["DENY"]
            assert "; Secure" in secure.getheader("Set-Cookie", "")
            assert secure.getheader("Server") == "nginx"  # server_tokens off: no version
            # Pages link static files by content hash, which nginx lets browsers keep for good;
            # the unhashed name is cached briefly, so an upgrade's new JS and CSS reach every browser.
            stylesheet = re.search(r'href="(/static/css/app\.[0-9a-f]{12}\.css)"', secure.body.decode())
            assert stylesheet, secure.body[:2000]
            hashed = request(nginx_port, "GET", stylesheet[1], host)
            assert hashed.status == 200 and hashed.body == (ROOT / "static" / "css" / "app.css").read_bytes()
            assert hashed.getheader("Cache-Control") == "max-age=315360000"
            assert request(nginx_port, "GET", "/static/css/app.css", host).getheader("Cache-Control") == "max-age=3600"
            # The API docs load Redoc from this server, not from a CDN (lab networks are often offline).
            docs = request(nginx_port, "GET", "/api/docs/", {**host, "X-Forwarded-Proto": "https"})
            assert docs.status == 200 and b"cdn" not in docs.body.lower()
            redoc = re.search(r'src="(/static/[^"]*redoc[^"]*\.js)"', docs.body.decode())
            assert redoc and request(nginx_port, "GET", redoc[1], host).status == 200, docs.body[:2000]
            assert request(nginx_port, "GET", "/healthz", {"Host": "attacker.example"}).status == 400
    finally:
        stop(gunicorn)
    # Access log on stdout, with the visitor's address from nginx's X-Real-IP.
    assert re.search(r'^127\.0\.0\.1 "GET /accounts/login/" 200 ', log.read_text(), re.M)


@pytest.mark.worker
def test_worker_health_check_pings_its_own_replica(tmp_path):
    """The worker service's health check against a real worker (kombu's filesystem broker stands in for Redis)."""
    env = {
        "DJANGO_SETTINGS_MODULE": "malaria_site.settings",
        "CELERY_BROKER_URL": "filesystem://",
        "CELERY_FILESYSTEM_BROKER_DIR": str(tmp_path / "broker"),
        "CELERY_QUEUE": "deploy-health-check",
        "VAR_DIR": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": os.environ.get("HOME", str(tmp_path)),
    }
    log = tmp_path / "worker.log"
    # As compose fills the command in, with no .env.
    worker = logged_process(interpolate(SERVICES["worker"]["command"], {}), env=env, log=log)
    try:
        deadline = time.monotonic() + 90
        ready = tmp_path / "worker-model-ready"  # VAR_DIR's, once the model has loaded and run
        while b" ready." not in log.read_bytes() or not ready.exists():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        (kind, script) = interpolate(SERVICES["worker"]["healthcheck"]["test"], {})
        assert kind == "CMD-SHELL" and script.count("--timeout 10") == 1

        def health(hostname: str, **more) -> int:
            command = script.replace("--timeout 10", "--timeout 3")
            environment = {**env, "HOSTNAME": hostname, **more}
            return subprocess.run(["sh", "-c", command], cwd=ROOT, env=environment, timeout=60).returncode

        assert health(socket.gethostname()) == 0  # Docker sets HOSTNAME to the container's host name
        assert health("another-replica") != 0
        # A worker that answers without a model to use fails every cell: it is not healthy either.
        assert health(socket.gethostname(), MODEL_WEIGHTS=str(ROOT / "ml" / "weights" / "missing.safetensors")) != 0
        # Nor is one whose file opened, but was no model it could run (another arch's, say).
        ready.unlink()
        assert health(socket.gethostname()) != 0
    finally:
        stop(worker)


@local_dotenv_sets_secret
@pytest.mark.parametrize("key", ["change-me", "change-me-" + "x" * 60, "too-short-to-be-random"])
def test_production_refuses_a_placeholder_or_short_secret_key(key):
    result = run_python(["-c", "import malaria_site.settings"], production_env(DJANGO_SECRET_KEY=key))
    assert result.returncode != 0 and "placeholder or shorter than 50 characters" in result.stderr


def test_production_refuses_the_example_database_password():
    placeholder = interpolate(
        SERVICES["web"]["environment"]["DATABASE_URL"], dotenv_as_intended(ENV_EXAMPLE) | {"DJANGO_SECRET_KEY": "x"}
    )
    assert ":change-me@" in placeholder  # what compose hands the web and the worker from a copied .env.example
    result = run_python(["-c", "import malaria_site.settings"], production_env(DATABASE_URL=placeholder))
    assert result.returncode != 0 and "database password is .env.example's placeholder" in result.stderr
    chosen = production_env(DATABASE_URL=placeholder.replace("change-me", "Zt8vQ2pL9xR4"))
    assert run_python(["-c", "import malaria_site.settings"], chosen).returncode == 0


@pytest.mark.parametrize("name", ["DJANGO_SECURE_SSL_REDIRECT", "DJANGO_SECURE_COOKIES"])
def test_a_blank_security_setting_keeps_its_production_default(name):
    """`NAME=` left blank (as uncommenting .env.example's `# NAME=` lines gives) keeps the default,
    as compose's ${NAME:-true} does; read as false, it turned the https redirect or secure cookies off."""
    show = "import malaria_site.settings as s; print(s.SECURE_SSL_REDIRECT, s.SESSION_COOKIE_SECURE)"
    assert run_python(["-c", show], production_env(**{name: ""})).stdout.split() == ["True", "True"]
    assert run_python(["-c", show], production_env(**{name: "false"})).stdout.split().count("False") == 1


def test_hsts_covers_hosts_under_the_sites_name_unless_told_not_to():
    show = "import malaria_site.settings as s; print(s.SECURE_HSTS_INCLUDE_SUBDOMAINS, s.SECURE_HSTS_PRELOAD)"
    assert run_python(["-c", show], production_env()).stdout.split() == ["True", "True"]
    told = production_env(DJANGO_HSTS_INCLUDE_SUBDOMAINS="false", DJANGO_HSTS_PRELOAD="false")
    assert run_python(["-c", show], told).stdout.split() == ["False", "False"]


def test_a_session_of_zero_hours_is_refused_at_start():
    """Beside SESSION_IDLE_MINUTES and API_TOKEN_DAYS, where 0 is "never", SESSION_HOURS=0 signed
    every user out the moment they signed in, with no message."""
    refused = run_python(["-c", "import malaria_site.settings"], {**production_env(), "SESSION_HOURS": "0"})
    assert refused.returncode != 0 and "SESSION_HOURS must be at least 1" in refused.stderr


@pytest.mark.parametrize("size", ["0", "-4"])
def test_a_model_batch_size_below_one_is_refused_at_start(size):
    """Beside MODEL_THREADS, where 0 is "every core", MODEL_BATCH_SIZE=0 started a worker whose every
    cell failed ("range() arg 3 must not be zero"), and a negative one crashed every task."""
    refused = run_python(["-c", "import malaria_site.settings"], {**production_env(), "MODEL_BATCH_SIZE": size})
    assert refused.returncode != 0 and "MODEL_BATCH_SIZE must be at least 1" in refused.stderr


@pytest.mark.parametrize("interval", ["0", "-5"])
def test_a_sweep_interval_of_zero_or_less_is_refused_at_start(interval):
    """0 is "off" for the settings beside it, but here beat sent the sweeper without pause: 8,717
    messages in 5 s into the housekeeping queue every worker takes from."""
    refused = run_python(["-c", "import malaria_site.settings"], production_env(SWEEP_INTERVAL_SECONDS=interval))
    assert refused.returncode != 0 and "SWEEP_INTERVAL_SECONDS must be above 0" in refused.stderr


@pytest.mark.parametrize(
    ("name", "value", "refusal"),
    [
        ("ANALYSIS_RETENTION_DAYS", "-5", "ANALYSIS_RETENTION_DAYS is a number of days from 1 to 36500"),
        ("ANALYSIS_RETENTION_DAYS", "1000000", "ANALYSIS_RETENTION_DAYS is a number of days from 1 to 36500"),
        ("ANALYSIS_MAX_ATTEMPTS", "0", "ANALYSIS_MAX_ATTEMPTS must be at least 1"),
    ],
)
def test_a_retention_or_attempt_count_out_of_range_is_refused_at_start(name, value, refusal):
    """A negative retention period kept everything with nothing said, a million days stopped the
    daily deletion with OverflowError, and 0 attempts failed every stale cell without a retry."""
    refused = run_python(["-c", "import malaria_site.settings"], production_env(**{name: value}))
    assert refused.returncode != 0 and refusal in refused.stderr


@pytest.mark.parametrize("hosts", [None, ""], ids=["unset", "blank"])
def test_production_without_its_host_names_is_refused_at_start(hosts):
    """It started, and answered every request for the site's real name "Bad Request (400)"."""
    env = production_env()
    del env["DJANGO_ALLOWED_HOSTS"]
    if hosts is not None:
        env["DJANGO_ALLOWED_HOSTS"] = hosts
    refused = run_python(["-c", "import malaria_site.settings"], env)
    assert refused.returncode != 0 and "DJANGO_ALLOWED_HOSTS is not set" in refused.stderr


@pytest.mark.parametrize(
    ("name", "rate"),
    [
        ("API_USER_RATE", "2000"),
        ("API_LOGIN_RATE", "20 per minute"),
        ("API_ANON_RATE", "100/week"),
        ("API_USER_RATE", "50000/month"),  # DRF reads the first letter: 50,000 a minute
    ],
)
def test_an_api_rate_the_throttles_cannot_read_is_refused_at_start(name, rate):
    """It passed start-up and `manage.py check`, then failed every request it applies to with a 500."""
    refused = run_python(["manage.py", "check"], {"DJANGO_SETTINGS_MODULE": "malaria_site.settings", name: rate})
    assert refused.returncode != 0 and f"{name}={rate!r} is not a rate such as 2000/hour" in refused.stderr
    accepted = run_python(["manage.py", "check"], {"DJANGO_SETTINGS_MODULE": "malaria_site.settings", name: "5/day"})
    assert accepted.returncode == 0, accepted.stderr


def test_an_api_rate_with_a_plural_unit_is_taken_as_it_reads():
    """DRF reads "2000/hours" as 2000 an hour, as it says, but the start-up check refused it."""
    rates = {"API_USER_RATE": "2000/hours", "API_ANON_RATE": "5/days", "API_LOGIN_RATE": "20/minutes"}
    accepted = run_python(["manage.py", "check"], {"DJANGO_SETTINGS_MODULE": "malaria_site.settings", **rates})
    assert accepted.returncode == 0, accepted.stderr


@pytest.mark.parametrize("name", ["LOGIN_MAX_FAILURES", "LOGIN_MAX_FAILURES_PER_ADDRESS"])
def test_a_lockout_after_zero_failures_is_refused_at_start(name):
    """0 turns other limits off, but here it would lock every account out before any password is checked."""
    env = {"DJANGO_SETTINGS_MODULE": "malaria_site.settings"}
    refused = run_python(["-c", "import malaria_site.settings"], {**env, name: "0"})
    assert refused.returncode != 0 and "with 0 nobody could sign in" in refused.stderr
    assert run_python(["-c", "import malaria_site.settings"], {**env, name: "1"}).returncode == 0


def test_debug_pages_are_refused_for_any_host_but_this_machine():
    """Debug error pages show local variables: a development setting served to the network is refused."""
    base = {"DJANGO_SETTINGS_MODULE": "malaria_site.settings", "DJANGO_DEBUG": "true"}
    served = run_python(["-c", "import malaria_site.settings"], {**base, "DJANGO_ALLOWED_HOSTS": "lab.example.org"})
    assert served.returncode != 0 and "debug error pages would show patient data" in served.stderr
    local = run_python(["-c", "import malaria_site.settings"], {**base, "DJANGO_ALLOWED_HOSTS": "localhost,127.0.0.1"})
    assert local.returncode == 0, local.stderr


@local_dotenv_sets_secret
def test_retention_runs_at_a_fixed_hour_and_redis_outlasts_a_long_task():
    """An interval schedule restarts with beat's container, so a daily deploy would never delete;
    Redis must not hand a task that may still be running to a second worker."""
    code = (
        "from malaria_site import settings as s;"
        "print(s.CELERY_BEAT_SCHEDULE['delete-expired-analyses']['schedule']);"
        "print(s.CELERY_BROKER_TRANSPORT_OPTIONS['visibility_timeout'])"
    )
    env = production_env(
        ANALYSIS_RETENTION_DAYS="30", CELERY_BROKER_URL="redis://127.0.0.1:6379/0", CELERY_TASK_SOFT_TIME_LIMIT="4000"
    )
    result = run_python(["-c", code], env)
    assert result.returncode == 0, result.stderr
    schedule, visibility = result.stdout.split("\n")[:2]
    assert schedule.startswith("<crontab: 0 3 ") and int(visibility) == 2 * 4030


def test_gunicorn_logs_paths_without_their_query_strings():
    config = (ROOT / "deploy" / "gunicorn.conf.py").read_text()
    (log_format,) = re.findall(r"access_log_format = '(.*)'", config)
    assert "%(U)s" in log_format and "%(r)s" not in log_format and "%(q)s" not in log_format


def test_the_embedded_sqlite_default_lets_a_long_read_and_a_write_overlap(tmp_path):
    """A CSV download streams from an open query: with a write-ahead log the worker can still record results."""
    code = (
        "import django; django.setup(); from django.db import connection;"
        "cursor = connection.cursor(); cursor.execute('PRAGMA journal_mode'); print(cursor.fetchone()[0])"
    )
    env = {"DJANGO_SETTINGS_MODULE": "malaria_site.settings", "VAR_DIR": str(tmp_path)}  # no DATABASE_URL
    result = run_python(["-c", code], env)
    assert result.returncode == 0 and result.stdout.strip() == "wal", result.stderr


def test_the_web_processes_never_load_torch():
    """Each gunicorn worker would hold about 480 MB more, and take 2 s longer to start, for a model
    only the Celery worker runs: the web decodes and checks uploads and sends tasks without it."""
    import subprocess
    import sys

    probe = (
        "import sys, django; django.setup();"
        "import malaria_site.urls, diagnosis.tasks, diagnosis.admin, diagnosis.api.views;"
        "from django.test import Client; Client().get('/healthz');"
        "from diagnosis.validation import validate_upload; from tests.factories import upload;"
        "validate_upload(upload());"
        "print(sorted(m for m in ('torch', 'cv2', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_gunicorn_outside_docker_reads_its_settings_from_dotenv_as_django_does(tmp_path):
    (tmp_path / "deploy").mkdir()
    shutil.copy(ROOT / "deploy" / "gunicorn.conf.py", tmp_path / "deploy")
    (tmp_path / ".env").write_text("GUNICORN_WORKERS=2\nGUNICORN_TIMEOUT=90\n")

    def read(**environment) -> list:
        # In a process of its own: reading .env sets the variables it finds.
        show = "import runpy; c = runpy.run_path('deploy/gunicorn.conf.py'); print(c['workers'], c['timeout'])"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUNICORN_")} | environment
        result = subprocess.run([sys.executable, "-c", show], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return [int(value) for value in result.stdout.split()]

    assert read() == [2, 90]
    assert read(GUNICORN_WORKERS="5") == [5, 90], "the environment (compose's) still wins"


@pytest.mark.parametrize("level", ["WARN", "info", "NOTSET"])
def test_a_log_level_the_worker_would_not_take_is_refused_at_start(level):
    """Python's logging takes WARN; Celery's --loglevel (compose passes LOG_LEVEL to it) does not."""
    env = {"DJANGO_SETTINGS_MODULE": "malaria_site.settings"}
    refused = run_python(["-c", "import malaria_site.settings"], {**env, "LOG_LEVEL": level})
    assert refused.returncode != 0 and "it must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in refused.stderr
    assert run_python(["-c", "import malaria_site.settings"], {**env, "LOG_LEVEL": "WARNING"}).returncode == 0


def test_a_lockout_lifted_in_another_process_is_lifted_for_the_web_server_too(tmp_path):
    """README: `manage.py changepassword` lifts a lockout. Without REDIS_URL the counts were in each
    process's memory, so the command's forgive() never reached the web server (429 after it)."""
    lock_then_wait = (
        "import django, sys; django.setup()\n"
        "from django.test import RequestFactory\n"
        "from diagnosis import login_throttle\n"
        "request = RequestFactory().post('/accounts/login/', REMOTE_ADDR='10.0.0.9')\n"
        "for _ in range(10): login_throttle.admit(request, 'demo')\n"
        "print('locked' if not login_throttle.admit(request, 'demo') else 'not locked', flush=True)\n"
        "sys.stdin.readline()\n"
        "print('admitted' if login_throttle.admit(request, 'demo') else 'still locked', flush=True)\n"
    )
    env = {"DJANGO_SETTINGS_MODULE": "malaria_site.settings", "VAR_DIR": str(tmp_path)}
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    web = subprocess.Popen(
        [sys.executable, "-c", lock_then_wait], cwd=ROOT, env=base | env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert web.stdout.readline().strip() == "locked"
        forgive = "import django; django.setup(); from diagnosis import login_throttle; login_throttle.forgive('demo')"
        assert run_python(["-c", forgive], env).returncode == 0
        web.stdin.write("\n")
        web.stdin.flush()
        assert web.stdout.readline().strip() == "admitted"
    finally:
        web.kill()
        web.wait()


BURST = """
import threading, django
django.setup()
from django.conf import settings
from django.test import RequestFactory
from diagnosis import login_throttle
N = 40
barrier, admitted = threading.Barrier(N), []
def guess():
    request = RequestFactory().post("/accounts/login/", REMOTE_ADDR="10.0.0.9")
    barrier.wait()
    admitted.append(login_throttle.admit(request, "demo"))
threads = [threading.Thread(target=guess) for _ in range(N)]
[t.start() for t in threads]
[t.join() for t in threads]
print(sum(admitted), settings.LOGIN_MAX_FAILURES)
"""


def test_guesses_sent_all_at_once_are_each_counted_without_redis(tmp_path):
    """Django's file cache reads, then writes: 40 guesses at once were all admitted against a limit of 5."""
    shown = run_python(["-c", BURST], {"DJANGO_SETTINGS_MODULE": "malaria_site.settings", "VAR_DIR": str(tmp_path)})
    assert shown.returncode == 0, shown.stderr
    admitted, limit = map(int, shown.stdout.split())
    assert admitted <= limit, f"{admitted} of 40 simultaneous guesses admitted; LOGIN_MAX_FAILURES={limit}"


def test_a_count_in_the_file_cache_keeps_its_expiry_and_ends_with_it(tmp_path, monkeypatch):
    """Django's file cache wrote an incremented count back with the default 300 s: a 15-minute
    lockout ended five minutes after the last guess."""
    from malaria_site import cache as caches

    counts = caches.CountingFileCache(str(tmp_path), {"TIMEOUT": 300})
    now = time.time()
    assert counts.add("failures", 1, timeout=900)
    assert counts.incr("failures") == 2 and counts.decr("failures") == 1 and counts.get("failures") == 1
    with open(counts._key_to_file("failures"), "rb") as entry:
        assert pickle.load(entry) == pytest.approx(now + 900, abs=5)  # not now + 300
    monkeypatch.setattr(caches.time, "time", lambda: now + 901)
    with pytest.raises(ValueError):  # ended with its lockout: the next failure starts a new count
        counts.incr("failures")


def test_gunicorns_log_leaves_the_query_of_a_request_line_it_refuses_out(tmp_path):
    """A lab script's `curl "$BASE/api/batches/?sample_reference=José-4711"` sends the UTF-8 bytes
    raw; nginx passes them on and gunicorn refuses the line, quoting it whole in its log:
    `Invalid request from ip=...: Invalid HTTP request line: 'GET /api/batches/?sample_reference=JosÃ©-4711 ...'`."""
    port, log = free_port(), tmp_path / "gunicorn.log"
    env = {**production_env(), "PATH": os.environ["PATH"], "VAR_DIR": str(tmp_path), "GUNICORN_WORKERS": "1"}
    server = logged_process(gunicorn_command(port), env=env, log=log)
    try:
        wait_for_port(port, server, log, timeout=60)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            raw.sendall("GET /api/batches/?sample_reference=José-4711 HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            assert raw.recv(65536).startswith(b"HTTP/1.1 400")
        deadline = time.monotonic() + 10
        while "Invalid request" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop(server)
    logged = log.read_text(errors="replace")
    assert "Invalid request from ip=127.0.0.1" in logged and "/api/batches/?(query left out)" in logged, logged
    assert "4711" not in logged and "Jos" not in logged, logged


def test_gunicorns_log_filter_leaves_out_whole_queries_and_nothing_else():
    """It stopped at a quote ("D'Almeida" kept "'Almeida-José-4711"), and marked a "?" ending a sentence."""
    without_queries = runpy.run_path(str(GUNICORN_CONF))["WITHOUT_QUERIES"]

    def filtered(message: str, *args) -> str:
        record = logging.LogRecord("gunicorn.error", logging.WARNING, __file__, 1, message, args, None)
        assert without_queries.filter(record)
        return record.getMessage()

    refused = "Invalid request from ip=10.0.0.9: Invalid HTTP request line: %r"
    for line in ("GET /api/batches/?sample_reference=D'Almeida-José-4711 HTTP/1.0", "GET /?search=Ana Lima HTTP/1.1"):
        shown = filtered(refused, line)
        assert "?(query left out) HTTP/1." in shown and not any(name in shown for name in ("Almeida", "Lima")), shown
    oom = "Worker (pid:%s) was sent %s! Perhaps out of memory?"
    assert filtered(oom, 4711, "SIGKILL") == "Worker (pid:4711) was sent SIGKILL! Perhaps out of memory?"
