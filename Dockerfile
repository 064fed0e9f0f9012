# syntax=docker/dockerfile:1
# The application image. docker-compose.yml runs every Python service from it: `migrate` (one-shot),
# `web` (gunicorn), `worker` (celery worker) and `beat` (celery beat).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_DEBUG=false \
    VAR_DIR=/data \
    MEDIA_ROOT=/data/media \
    STATIC_ROOT=/data/static

# curl is used by the web health check. opencv-python-headless, torch and psycopg[binary] bundle
# their native libraries, so nothing else is needed from Debian. (Unpinned: bookworm's security
# updates replace old package versions, so a pin would break the build.)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# requirements.txt pins torch==2.14.1 and torchvision==0.29.1. From PyPI those are the CUDA builds
# (several GB of nvidia-* wheels). The workers run on CPU, so to shrink the image by several GB
# build with PyTorch's CPU wheel index, whose `2.14.1+cpu` builds satisfy the same pins: set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu in .env (docker-compose.yml passes it on).
ARG TORCH_INDEX_URL=""
COPY requirements.txt .
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r requirements.txt

# Only what runs in production is copied: never .env (secrets), var/ (local patient data) or .venv.
# .dockerignore keeps those out of the build context too, and training checkpoints out of ml/.
COPY manage.py ./
COPY malaria_site/ malaria_site/
COPY diagnosis/ diagnosis/
COPY templates/ templates/
COPY static/ static/
COPY deploy/gunicorn.conf.py deploy/
# The model the workers load (MODEL_WEIGHTS defaults to ml/weights/malaria_vgg19.safetensors).
COPY ml/ ml/
ARG REQUIRE_WEIGHTS=1
RUN if [ "$REQUIRE_WEIGHTS" = 1 ] && [ ! -f ml/weights/malaria_vgg19.safetensors ]; then \
        echo "ml/weights/malaria_vgg19.safetensors is missing: train it first (README.md, 'The model')," \
             "or build with REQUIRE_WEIGHTS=0 (in .env, or --build-arg) and mount a model at MODEL_WEIGHTS." >&2; \
        exit 1; \
    fi

# Static files are collected into the image; the web service copies them into the volume nginx
# serves at start-up, so a rebuilt image never leaves nginx with stale files. The secret key here
# only lets the settings load for collectstatic; it is not kept in the image's environment.
RUN useradd --create-home --no-log-init --uid 1000 app \
    && DJANGO_SECRET_KEY=collectstatic-only-not-a-secret-just-long-enough-for-the-check DJANGO_ALLOWED_HOSTS=localhost CELERY_BROKER_URL=memory:// \
       python manage.py collectstatic --noinput --verbosity 0 \
    && mkdir -p /data/media /data/static-shared \
    && chown -R app:app /data
# Named volumes mounted at /data/media and /data/static-shared start out owned by `app`, because
# Docker copies the ownership of these image folders into a new, empty volume.
# `app`, by number, so a runtime can verify that the container does not run as root.
USER 1000:1000

EXPOSE 8000
# The web service, on every address of the container (its config alone listens on 127.0.0.1, for
# gunicorn outside a container); compose gives the web service its own command, and overrides the
# command for migrate, worker and beat.
CMD ["gunicorn", "--config", "deploy/gunicorn.conf.py", "--bind", "0.0.0.0:8000", "malaria_site.wsgi"]
