# Stepgate as a sidecar container: `docker build -t stepgate .`
#   docker run -v stepgate-data:/var/lib/stepgate -v ./stepgate.yaml:/etc/stepgate/config.yaml:ro \
#     -p 8080:8080 stepgate
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY client/python ./client/python
# Extras to install with it, e.g. `docker build --build-arg EXTRAS=otel` for OpenTelemetry.
ARG EXTRAS=""
RUN pip install ".${EXTRAS:+[$EXTRAS]}" && rm -rf /src

RUN useradd --system --uid 10001 --home-dir /var/lib/stepgate stepgate \
    && mkdir -p /var/lib/stepgate /etc/stepgate \
    && chown stepgate:stepgate /var/lib/stepgate
COPY config.example.yaml /etc/stepgate/config.yaml

USER stepgate
WORKDIR /var/lib/stepgate
VOLUME ["/var/lib/stepgate"]
EXPOSE 8080

# The internal listener stays on loopback inside the container; the check runs there too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["stepgate", "serve"]
CMD ["--config", "/etc/stepgate/config.yaml"]
