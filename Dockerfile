# The backend and the training worker: one image, two commands (see docker-compose.yml).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app

# torch first, on its own, so its build is chosen here; TORCH_INDEX picks CPU or a CUDA build.
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX=""
RUN pip install ${TORCH_INDEX:+--index-url $TORCH_INDEX} $TORCH_SPEC

COPY pyproject.toml README.md ./
COPY maskclip_engine maskclip_engine
COPY maskclip_service maskclip_service
COPY ls_integration ls_integration
COPY backend backend
COPY workers workers
RUN pip install ".[server,worker]"

# The services run as an unprivileged user that owns only /data (models, caches, the embedded queue).
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin maskclip \
    && mkdir -p /data/models /data/cache && chown -R maskclip:maskclip /data
USER maskclip

ENV MODEL_DIR=/data/models MASKCLIP_CACHE_DIR=/data/cache MASKCLIP_HOST=0.0.0.0 MASKCLIP_PORT=9090
EXPOSE 9090
CMD ["gunicorn", "--workers", "1", "--threads", "4", "--timeout", "600", "--bind", "0.0.0.0:9090", "backend.app:create_app()"]
