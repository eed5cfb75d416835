# The gateway image: CPU preprocessing + FastAPI, talking gRPC to a Triton container. No torch needed.
# Batch workers use it too (`hybridcn batch` is installed). PYTHON_VERSION is the one place the image's
# Python is named: tests/integration/test_deploy_pins.py resolves deploy/requirements-serve.txt for it.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends libglib2.0-0 && rm -rf /var/lib/apt/lists/*
COPY deploy/requirements-serve.txt /app/deploy/requirements-serve.txt
RUN pip install --no-cache-dir -r deploy/requirements-serve.txt
COPY pyproject.toml /app/
COPY hybridcn /app/hybridcn
COPY preprocessing /app/preprocessing
COPY models /app/models
COPY export /app/export
COPY engine /app/engine
COPY gateway /app/gateway
COPY training /app/training
COPY batch /app/batch
RUN pip install --no-cache-dir --no-deps .
ENV HYBRIDCN_REPOSITORY=/models
# a container is reached from beyond its own loopback: the app refuses to start without HYBRIDCN_API_KEYS
ENV HYBRIDCN_REQUIRE_API_KEYS=true
EXPOSE 8000
CMD ["uvicorn", "gateway.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--workers", "4"]
