# The application image: web (gunicorn), worker and beat all run from it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VAR_DIR=/data MEDIA_ROOT=/data/media STATIC_ROOT=/data/static

RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
# requirements.txt pins torch==2.14.1 / torchvision==0.29.1. To shrink the image by several GB, add
# `--extra-index-url https://download.pytorch.org/whl/cpu` to install their CPU-only builds.
RUN pip install -r requirements.txt

COPY . .
RUN useradd --create-home --uid 1000 app \
    && mkdir -p /data/media /data/static \
    && DJANGO_DEBUG=true python manage.py collectstatic --noinput --verbosity 0 \
    && chown -R app:app /data
USER app

EXPOSE 8000
CMD ["gunicorn", "--config", "deploy/gunicorn.conf.py", "malaria_site.wsgi"]
