# cxr-miner: the same install as `make` (the pinned versions of requirements.lock, then the
# project), on a CUDA runtime.
# Not built in CI (no Docker engine there); the Makefile is the tested path.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv $VIRTUAL_ENV

WORKDIR /app
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock
COPY pyproject.toml README.md ./
COPY flows ./flows
COPY miner ./miner
COPY storage ./storage
RUN pip install --no-cache-dir --no-deps .

ENTRYPOINT ["cxr-miner"]
CMD ["--help"]
