# dispatchd container image: a wheel built in one stage, installed into a slim runtime.
#   docker build -t dispatchd .
#   docker run --rm dispatchd --help

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dispatchd ./dispatchd
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DISPATCHD_STATE__DIR=/var/lib/dispatchd \
    DISPATCHD_HTTP__LISTEN=0.0.0.0:9464 \
    DISPATCHD_LOG__FORMAT=json
RUN useradd --system --uid 10001 --user-group --no-create-home dispatchd \
    && mkdir -p /var/lib/dispatchd \
    && chown dispatchd:dispatchd /var/lib/dispatchd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER dispatchd
WORKDIR /var/lib/dispatchd
VOLUME ["/var/lib/dispatchd"]
# 9464: the status page, /metrics, /livez, /readyz; 50051: the local dispatch API (`dispatchd api`).
EXPOSE 9464 50051
# curl is not in the slim image; the port follows DISPATCHD_HTTP__LISTEN.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('DISPATCHD_HTTP__LISTEN', ':9464').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/livez', timeout=4)"]
# Exec form: no shell in between, so dispatchd (PID 1) receives SIGTERM itself.
ENTRYPOINT ["dispatchd"]
CMD ["run"]
