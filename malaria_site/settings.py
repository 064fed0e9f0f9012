"""Settings, all read from the environment (see .env.example) with safe development defaults."""

import re
from pathlib import Path

import environ
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured
from kombu import Queue

from diagnosis.retention import MAX_RETENTION_DAYS
from malaria_site.cache import file_cache, redis_cache

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()


def env_flag(name: str, *, default: bool) -> bool:
    """A yes/no setting where a blank value (``NAME=`` in .env) keeps the default, as compose's
    ``${NAME:-true}`` does: read as false, a blank would turn a protection off."""
    return env.bool(name) if env(name, default="").strip() else default


def env_path(name: str, *, default: Path) -> Path:
    """A file setting where a blank value (``NAME=`` in .env) keeps the default, as compose's
    ``${NAME:-...}`` does: read as Path(""), it was the current folder."""
    return Path(env(name, default="").strip() or default)


def api_rate(name: str, *, default: str) -> str:
    """A rate as DRF's throttles read it ("2000/hour"): one they cannot read passed every check and
    then failed each request it applies to with a 500."""
    rate = env(name, default=default)
    # DRF reads the unit's first letter only: "50000/month" would be 50,000 a minute.
    if not re.fullmatch(r"\d+/(s|sec|seconds?|m|min|minutes?|h|hours?|d|days?)", rate):
        raise ImproperlyConfigured(
            f"{name}={rate!r} is not a rate such as 2000/hour: a number, '/', then second, minute, hour or day."
        )
    return rate


environ.Env.read_env(BASE_DIR / ".env", overwrite=False)
VAR_DIR = Path(env("VAR_DIR", default=str(BASE_DIR / "var")))

# --- Core -----------------------------------------------------------------------------------
DEBUG = env.bool("DJANGO_DEBUG", default=True)
# Development gets a fixed key; anything else must be given one.
SECRET_KEY = env("DJANGO_SECRET_KEY") if not DEBUG else env("DJANGO_SECRET_KEY", default="dev-only-insecure-key")
# A copied .env.example's placeholder is public: production must not sign sessions with it.
if not DEBUG and (len(SECRET_KEY) < 50 or SECRET_KEY.startswith("change-me")):
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY is a placeholder or shorter than 50 characters; generate one with "
        "python3 -c 'import secrets; print(secrets.token_urlsafe(50))'"
    )
THIS_MACHINE = ["localhost", "127.0.0.1", "[::1]", "testserver"]
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=THIS_MACHINE if DEBUG else [])
# Production answers the host names listed only: without them every request would get a bare
# "Bad Request (400)", with nothing saying why.
if not DEBUG and not ALLOWED_HOSTS:
    raise ImproperlyConfigured(
        "DJANGO_ALLOWED_HOSTS is not set: with DJANGO_DEBUG=false the site answers only the host names it "
        "lists (e.g. screening.hospital.example), and refuses every request to any other with 400."
    )
# Debug error pages show local variables (file names, sample references) and settings: never to others.
if DEBUG and not set(ALLOWED_HOSTS) <= set(THIS_MACHINE):
    raise ImproperlyConfigured(
        f"DJANGO_DEBUG=true serves this machine only, but DJANGO_ALLOWED_HOSTS names {ALLOWED_HOSTS}: "
        "debug error pages would show patient data. Set DJANGO_DEBUG=false (and DJANGO_SECRET_KEY)."
    )
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "diagnosis",
]

MIDDLEWARE = [
    "diagnosis.middleware.DebugServesThisMachineOnlyMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "diagnosis.middleware.RefuseNulCharactersMiddleware",
    "diagnosis.middleware.ApiSlashMiddleware",
    "diagnosis.middleware.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "diagnosis.middleware.NoStoreWhenSignedInMiddleware",
    # After the sign-in is known, so its refusal page shows who is signed in (and is not kept by the
    # browser: inside no-store); before anything reads the body.
    "diagnosis.middleware.RequestSizeLimitMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "diagnosis.middleware.SignOutMiddleware",
    "diagnosis.middleware.SameSignInMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "diagnosis.middleware.SiteNotFoundPageMiddleware",
]

ROOT_URLCONF = "malaria_site.urls"
WSGI_APPLICATION = "malaria_site.wsgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "diagnosis.context_processors.roles",
                "diagnosis.context_processors.idle_sign_out",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=0)
# A kept connection is tried before each request reuses it: after PostgreSQL restarted, each web
# process answered its first request (an upload, perhaps) with a 500 on the connection it had lost.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# .env.example's POSTGRES_PASSWORD is public too; the database takes it at its first start.
if not DEBUG and DATABASES["default"].get("PASSWORD", "").startswith("change-me"):
    raise ImproperlyConfigured(
        "The database password is .env.example's placeholder: set POSTGRES_PASSWORD to a secret "
        "(see docs/deploy.md, which says how to change it once the database has started)"
    )
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A file, not memory, so a worker process can share the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}
    # Transactions take the write lock when they begin, so one that reads and then writes (recording
    # a result) waits its turn behind the web's writes instead of failing with "database is locked";
    # and with a write-ahead log, a long read (a CSV download) does not hold the worker's writes up.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        timeout=20, transaction_mode="IMMEDIATE", init_command="PRAGMA journal_mode=WAL"
    )

# --- Auth -----------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "diagnosis:dashboard"
LOGOUT_REDIRECT_URL = "login"
LOGIN_MAX_FAILURES = env.int("LOGIN_MAX_FAILURES", default=5)
# Failures from one address over all usernames: trying one password on every account is refused too.
LOGIN_MAX_FAILURES_PER_ADDRESS = env.int("LOGIN_MAX_FAILURES_PER_ADDRESS", default=30)
LOGIN_LOCKOUT_SECONDS = env.int("LOGIN_LOCKOUT_SECONDS", default=900)
# Other settings read 0 as "off"; here 0 would refuse every sign-in, so it is refused at start.
if min(LOGIN_MAX_FAILURES, LOGIN_MAX_FAILURES_PER_ADDRESS) < 1:
    raise ImproperlyConfigured(
        "LOGIN_MAX_FAILURES and LOGIN_MAX_FAILURES_PER_ADDRESS must be at least 1: with 0 nobody could sign in."
    )
# Behind a reverse proxy every request comes from the proxy: name the header (as in request.META)
# that the proxy overwrites with the client's address, e.g. HTTP_X_REAL_IP behind the bundled nginx
# (of a list, such as X-Forwarded-For, the last entry: the proxy's). Limits count an IPv6 client's /64.
CLIENT_IP_HEADER = env("CLIENT_IP_HEADER", default="REMOTE_ADDR")
# Clinical workstations are shared: a sign-in lasts one shift at most and ends with the browser.
SESSION_COOKIE_AGE = env.int("SESSION_HOURS", default=12) * 3600
if SESSION_COOKIE_AGE < 3600:  # unlike the limits beside it, 0 is no "never" here: every sign-in would end at once
    raise ImproperlyConfigured("SESSION_HOURS must be at least 1: with 0 every sign-in would end at once.")
SESSION_EXPIRE_AT_BROWSER_CLOSE = True
# A sign-in also ends after this long without the user doing anything (0: never), for the walk-away case.
SESSION_IDLE_MINUTES = env.int("SESSION_IDLE_MINUTES", default=30)
# An API token stops working this many days after it was issued (0: never); a new POST issues another.
API_TOKEN_DAYS = env.int("API_TOKEN_DAYS", default=90)

# --- Cache (login throttling, API rate limits): shared through Redis when there is one ---------
# Falling back to memory (malaria_site.cache): a Redis outage stops neither the sign-ins and uploads
# nor the counting, which goes on per process meanwhile.
if REDIS_URL := env("REDIS_URL", default=""):
    CACHES = {"default": redis_cache(REDIS_URL)}
else:
    # Files, not each process's memory: a lockout lifted by `manage.py changepassword` (another
    # process) is lifted for the web server too, and gunicorn's workers count the limits together.
    CACHES = {"default": file_cache(str(VAR_DIR / "cache"))}

# --- Internationalisation -------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = env("DJANGO_TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

# --- Static and protected media -------------------------------------------------------------
STATIC_URL = "static/"
STATIC_ROOT = Path(env("STATIC_ROOT", default=str(VAR_DIR / "static")))
STATICFILES_DIRS = [BASE_DIR / "static"]
# Production pages link each static file by a name carrying its content hash (collectstatic writes
# the manifest), so a browser fetches a release's new JS and CSS at once instead of running cached
# old code against new pages; nginx can then cache those names for good.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage."
        + ("StaticFilesStorage" if DEBUG else "ManifestStaticFilesStorage")
    },
}
# Uploads and overlays are patient data: MEDIA_ROOT is never exposed under a public URL; files are
# streamed by views that check ownership (or handed to nginx via X-Accel-Redirect).
MEDIA_ROOT = Path(env("MEDIA_ROOT", default=str(VAR_DIR / "media")))
PROTECTED_MEDIA_ACCEL_PREFIX = env("PROTECTED_MEDIA_ACCEL_PREFIX", default="")
# Readable by others (644) for the bundled nginx, which runs as another user; the embedded default
# (scripts/start) keeps them to their own user (600), as nothing else on a shared PC may read them.
FILE_UPLOAD_PERMISSIONS = int(env("FILE_UPLOAD_PERMISSIONS", default="") or "644", 8)  # blank: the default

# --- Uploads --------------------------------------------------------------------------------
UPLOAD_MAX_BYTES = env.int("UPLOAD_MAX_BYTES", default=10 * 1024 * 1024)
UPLOAD_MIN_SIDE = env.int("UPLOAD_MIN_SIDE", default=16)
UPLOAD_MAX_SIDE = env.int("UPLOAD_MAX_SIDE", default=4096)
BATCH_MAX_FILES = env.int("BATCH_MAX_FILES", default=100)
DATA_UPLOAD_MAX_NUMBER_FILES = BATCH_MAX_FILES
# Whole-request cap (a batch of images), checked from Content-Length before the body is read.
REQUEST_MAX_BYTES = env.int("REQUEST_MAX_BYTES", default=200 * 1024 * 1024)
# Form fields and JSON bodies are read into memory: Django's default cap, far below a batch's size.
DATA_UPLOAD_MAX_MEMORY_SIZE = 2_621_440
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
FILE_UPLOAD_HANDLERS = [
    "diagnosis.upload_handlers.MemoryFileKeepingItsName",
    "diagnosis.upload_handlers.TemporaryFileKeepingItsName",
]
# Larger files are spooled to disk while the request is read: under MEDIA_ROOT, with the patient
# data it is, rather than in /tmp, where the copy a killed process leaves of a patient's image
# would stay; the nightly sweep (delete_orphaned_files) clears this folder too.
FILE_UPLOAD_TEMP_DIR = str(MEDIA_ROOT / "incoming")
Path(FILE_UPLOAD_TEMP_DIR).mkdir(parents=True, exist_ok=True)
# Rows in one dashboard CSV: a larger one would outlast gunicorn's timeout, which cuts a streamed
# download short without any sign (about 125 us a row: 50,000 in some 6 s).
EXPORT_MAX_ROWS = env.int("EXPORT_MAX_ROWS", default=50_000)

# --- Model ----------------------------------------------------------------------------------
MODEL_WEIGHTS = env_path("MODEL_WEIGHTS", default=BASE_DIR / "ml" / "weights" / "malaria_vgg19.safetensors")
MODEL_BATCH_SIZE = env.int("MODEL_BATCH_SIZE", default=16)
if MODEL_BATCH_SIZE < 1:  # beside MODEL_THREADS, where 0 is "every core": here it would fail every cell
    raise ImproperlyConfigured("MODEL_BATCH_SIZE must be at least 1 (images the model takes at once).")
# Threads torch may use per worker process; 0 uses every core the host has. Set it when several
# workers share a host, or a container's CPU limit is below the host's core count.
MODEL_THREADS = env.int("MODEL_THREADS", default=0)
# Calls are marked borderline within this share of the room between the model's threshold and
# either end of the scale (ml.metrics.borderline_band, whose default this is); 0 marks none.
BORDERLINE_CONFIDENCE = env.float("BORDERLINE_CONFIDENCE", default=0.5)
if not 0 <= BORDERLINE_CONFIDENCE <= 1:
    raise ImproperlyConfigured("BORDERLINE_CONFIDENCE is a share of the scale beside the threshold, from 0 to 1.")

# --- Celery ---------------------------------------------------------------------------------
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL or "filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = Path(env("CELERY_FILESYSTEM_BROKER_DIR", default=str(VAR_DIR / "broker")))
    # kombu's filesystem transport needs its folders to exist before the first message.
    (_broker_dir / "control").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT = "malaria_site.broker:Transport"  # kombu's, safe against a full disk
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir),
        "data_folder_out": str(_broker_dir),
        "control_folder": str(_broker_dir / "control"),
        # The worker polls the folder; kombu's default 1 s would add up to a second to every upload.
        "polling_interval": 0.2,
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {}
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_QUEUE", default="analyses")
# The sweeper, the callbacks and the deletions have a queue of their own, which every worker also
# takes from (turn about with the analyses): behind a backlog of cells they wait for the task in
# hand, not for the whole backlog.
HOUSEKEEPING_QUEUE = f"{CELERY_TASK_DEFAULT_QUEUE}-housekeeping"
CELERY_TASK_QUEUES = [Queue(CELERY_TASK_DEFAULT_QUEUE), Queue(HOUSEKEEPING_QUEUE)]
CELERY_TASK_ROUTES = {
    f"diagnosis.tasks.{name}": {"queue": HOUSEKEEPING_QUEUE}
    for name in (
        "deliver_batch_callback",
        "requeue_stale_analyses",
        "delete_expired_analyses",
        "delete_orphaned_files",
        "clear_expired_sessions",
    )
}
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Each pool process loads and warms up the model before taking tasks (diagnosis.tasks): give it
# longer than Celery's default 4 s to report ready.
CELERY_WORKER_PROC_ALIVE_TIMEOUT = 60
# The worker and beat log as the web does (LOGGING below): Celery's own setup of the root logger
# wrote "[time: INFO/ForkPoolWorker-2] event=...", with no level= or logger= to filter on.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=300)
CELERY_TASK_TIME_LIMIT = CELERY_TASK_SOFT_TIME_LIMIT + 30
if not CELERY_BROKER_URL.startswith("filesystem://"):
    # Redis hands an unacknowledged task to another worker after this long: it must outlast the
    # longest a task may run, or a running cell is analysed twice.
    CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] = max(3600, 2 * CELERY_TASK_TIME_LIMIT)
    # Without these a Redis that stalls (paused, swapping, behind a network dropping packets)
    # holds an upload's enqueue, and so its request, for ever; with them the upload is answered
    # and its cells wait for the sweeper. Longer than the worker's 1 s BRPOP polls.
    CELERY_BROKER_TRANSPORT_OPTIONS |= {"socket_connect_timeout": 3, "socket_timeout": 10}
# Fail fast when the broker is down: the upload stays queued and the sweeper enqueues it later.
CELERY_BROKER_CONNECTION_TIMEOUT = 3
# A worker or beat whose broker is down reconnects for as long as that takes: Celery's default gave
# up after 100 tries (some 47 minutes), and under scripts/start took the web server with it. None,
# not 0, which kombu reads as "no retries".
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5}

# --- Analyses: the sweeper, attempts and retention ------------------------------------------
SWEEP_INTERVAL_SECONDS = env.float("SWEEP_INTERVAL_SECONDS", default=60.0)
if not SWEEP_INTERVAL_SECONDS > 0:  # beat would send the sweeper without pause, flooding the broker
    raise ImproperlyConfigured("SWEEP_INTERVAL_SECONDS must be above 0: the sweeper cannot be switched off.")
# Analyses queued or running longer than this are considered lost and enqueued again.
ANALYSIS_STALE_SECONDS = env.int("ANALYSIS_STALE_SECONDS", default=600)
# A cell whose worker died on it this many times is failed, not sent again (a poison image).
ANALYSIS_MAX_ATTEMPTS = env.int("ANALYSIS_MAX_ATTEMPTS", default=3)
if ANALYSIS_MAX_ATTEMPTS < 1:  # 0 failed every stale cell as a poison image, never sending it again
    raise ImproperlyConfigured("ANALYSIS_MAX_ATTEMPTS must be at least 1.")
# The lab's retention period: analyses older than this many days are deleted with their images,
# once a day. 0 keeps everything.
ANALYSIS_RETENTION_DAYS = env.int("ANALYSIS_RETENTION_DAYS", default=0)
if not 0 <= ANALYSIS_RETENTION_DAYS <= MAX_RETENTION_DAYS:
    raise ImproperlyConfigured(
        f"ANALYSIS_RETENTION_DAYS is a number of days from 1 to {MAX_RETENTION_DAYS}, or 0 to keep everything."
    )

# --- Batch callbacks (diagnosis.callbacks) ---------------------------------------------------
# The only hosts a batch's callback_url may name (none: off), the HMAC key that signs each body
# (unset: callbacks off), and how many attempts to make.
CALLBACK_ALLOWED_HOSTS = env.list("CALLBACK_ALLOWED_HOSTS", default=[])
CALLBACK_SECRET = env("CALLBACK_SECRET", default="")
# Results name patients' samples: plain-http receivers only where the network itself is trusted.
CALLBACK_ALLOW_HTTP = env.bool("CALLBACK_ALLOW_HTTP", default=False)
CALLBACK_MAX_ATTEMPTS = env.int("CALLBACK_MAX_ATTEMPTS", default=6)

# --- Periodic tasks (Celery beat) ------------------------------------------------------------
# Beat's own record of when each task last ran: with the rest of this installation's data, so two
# platforms started from one checkout (VAR_DIR apart) keep a schedule each. Compose names its own.
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "requeue-stale-analyses": {
        "task": "diagnosis.tasks.requeue_stale_analyses",
        "schedule": SWEEP_INTERVAL_SECONDS,
    },
    # Files left by an upload process killed mid-batch (diagnosis.services.delete_orphaned_files).
    "delete-orphaned-files": {
        "task": "diagnosis.tasks.delete_orphaned_files",
        "schedule": crontab(hour=3, minute=30),
    },
    "clear-expired-sessions": {
        "task": "diagnosis.tasks.clear_expired_sessions",
        "schedule": crontab(hour=3, minute=45),
    },
}
if ANALYSIS_RETENTION_DAYS > 0:
    # At a fixed hour, not "every 24 h": beat's interval restarts whenever its container is recreated,
    # and a site that deploys daily would never delete anything.
    CELERY_BEAT_SCHEDULE["delete-expired-analyses"] = {
        "task": "diagnosis.tasks.delete_expired_analyses",
        "schedule": crontab(hour=3, minute=0),
    }

# --- REST API -------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "diagnosis.api.authentication.ExpiringTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "diagnosis.api.negotiation.JsonUnlessSignedInBrowser",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "diagnosis.api.exceptions.api_exception_handler",
    "DEFAULT_THROTTLE_CLASSES": [
        "diagnosis.api.throttling.UserRateThrottle",
        "diagnosis.api.throttling.AnonRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "user": api_rate("API_USER_RATE", default="2000/hour"),
        "anon": api_rate("API_ANON_RATE", default="100/hour"),
        "login": api_rate("API_LOGIN_RATE", default="20/minute"),
    },
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Malaria cell screening API",
    "DESCRIPTION": "Submit thin-smear red-blood-cell images; a VGG19 classifies each as Parasitized "
    "or Uninfected and renders a Grad-CAM heatmap.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # The API description is not patient data; publishing it lets lab integrators read it before signing in.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    # Hospital networks are often offline, and a CDN would learn who reads the docs: Redoc is served from here.
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {"AnalysisLabelEnum": "diagnosis.models.Analysis.Label"},
    # The enum hook is drf-spectacular's default; the other adds what its decorators cannot say.
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "diagnosis.api.schema.declare_retry_after",
    ],
}

# --- Security (production) ------------------------------------------------------------------
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_flag("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
SESSION_COOKIE_SECURE = env_flag("DJANGO_SECURE_COOKIES", default=not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
# Messages ("Deleted <file name>: ...") wait in the session, not in a cookie anyone at the
# workstation can read: a file name may be the patient's.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=0 if DEBUG else 31536000)
# Every host under the site's name must serve HTTPS then: a hospital whose site is its bare domain
# turns these off for the HTTP-only hosts beneath it.
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_flag("DJANGO_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG)
SECURE_HSTS_PRELOAD = env_flag("DJANGO_HSTS_PRELOAD", default=not DEBUG)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REDIRECT_EXEMPT = [r"^healthz/?$"]

# --- Logging --------------------------------------------------------------------------------
# The names both Python's logging setup (not "info") and Celery's --loglevel (not "WARN", which
# compose would pass to the worker and beat, stopping them) take.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_LEVEL = env("LOG_LEVEL", default="INFO")
if LOG_LEVEL not in LOG_LEVELS:
    raise ImproperlyConfigured(f"LOG_LEVEL is {LOG_LEVEL!r}; it must be one of {', '.join(LOG_LEVELS)}.")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"keyvalue": {"format": "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"}},
    "filters": {
        "request_line_without_query": {"()": "malaria_site.log_filters.RequestLineWithoutQuery"},
        "as_warning_without_traceback": {"()": "malaria_site.log_filters.AsWarningWithoutTraceback"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "keyvalue"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    # runserver's access log (scripts/start), which Django's own logging setup would write whole.
    "loggers": {
        "django.server": {
            "handlers": ["console"],
            "level": "INFO",
            "propagate": False,
            "filters": ["request_line_without_query"],
        },
        "django.security.DisallowedHost": {"filters": ["as_warning_without_traceback"]},
    },
}
