# The example trip service (examples/python/trip_service.py) as the sidecar pod's app.
# It needs the stepgate SDK and aiohttp, both in the gateway's image, so it builds on that:
#   docker build -t stepgate:0.1.0 .
#   docker build -f deploy/kubernetes/trips.Dockerfile -t stepgate-trips:0.1.0 .
ARG STEPGATE_IMAGE=stepgate:0.1.0
FROM ${STEPGATE_IMAGE}
COPY examples/python/trip_service.py /app/trip_service.py
HEALTHCHECK NONE
ENTRYPOINT ["python", "/app/trip_service.py"]
CMD ["--host", "127.0.0.1", "--port", "3000"]
