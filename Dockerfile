# Any chapter from 04 on:
#   docker build --build-arg CHAPTER=05-graceful-shutdown -t tutorial .
#   docker run -e DATABASE_URL=... -p 8080:8080 tutorial

# A pinned Debian release: a bare 3.12-slim moves under you (erratum 12).
ARG BASE_IMAGE=python:3.12-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8080 \
    WEB_CONCURRENCY=2
WORKDIR /app

# A user (10001) with no shell, no home and no write access to its code.
RUN useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin app

# Dependencies in their own layer: editing app.py does not reinstall them.
# The service's lock pins the whole tree, each file checked against its hash.
COPY requirements.lock ./
RUN python -m pip install --no-cache-dir --require-hashes \
        -r requirements.lock

# Declared late, so every chapter shares the layers above. Default: the last.
ARG CHAPTER=10-observability
COPY chapters/${CHAPTER}/ ./
# Numeric, so a platform can check it is not root without reading /etc/passwd.
USER 10001:10001

EXPOSE 8080
# Liveness only: /health never touches the database. No curl here; Python.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; \
    u.urlopen('http://127.0.0.1:%s/health' % os.environ['PORT'], timeout=2)"]

# Exec form: Gunicorn is PID 1 and gets docker stop's SIGTERM. As PID 1,
# /bin/sh would ignore it, and every stop would end in SIGKILL (erratum 2).
CMD ["gunicorn", "-c", "gunicorn.conf.py"]
