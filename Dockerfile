# Builds any chapter from 04 on:  docker build --build-arg CHAPTER=05-graceful-shutdown -t tutorial .
# Run:  docker run -e DATABASE_URL=... -e PORT=8080 -e WEB_CONCURRENCY=2 -p 8080:8080 tutorial

# A pinned Debian release: a bare 3.12-slim moves to the next release under you (erratum 12).
ARG BASE_IMAGE=python:3.12-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8080 \
    WEB_CONCURRENCY=2
WORKDIR /app

# A user (10001) with no shell, no home and no write access to the code it runs.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app

# Dependencies in a layer of their own, before the code: editing app.py does not reinstall them.
# The service's lock: every package of the tree pinned, each file checked against its hash.
COPY requirements.lock ./
RUN python -m pip install --no-cache-dir --require-hashes -r requirements.lock

# Declared this late so every chapter shares the layers above it. The default is the last chapter.
ARG CHAPTER=06-health-checks
COPY chapters/${CHAPTER}/ ./
# Numeric, so a platform can check it is not root without reading /etc/passwd.
USER 10001:10001

EXPOSE 8080
# Liveness only: /health never touches the database. The slim image has no curl, but it has Python.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['PORT'], timeout=2)"]

# Exec form: Gunicorn is PID 1 and gets docker stop's SIGTERM itself. A shell-form CMD would make
# /bin/sh PID 1, which ignores SIGTERM, so every stop waits out the timeout and SIGKILLs (erratum 2).
# Gunicorn reads PORT and WEB_CONCURRENCY through gunicorn.conf.py: no shell is needed to expand them.
CMD ["gunicorn", "-c", "gunicorn.conf.py"]
