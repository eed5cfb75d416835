# NVIDIA's Triton with this project installed, so the Python `preprocess` step of the raw ensemble
# imports the same `preprocessing` package as the gateway (one implementation, two places it runs).
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}
# The Python of that image (Ubuntu 22.04's 3.10), which Triton's Python backend runs: pip evaluates the
# `python_version` markers of requirements-serve.txt for it, and tests/integration/test_deploy_pins.py
# resolves the file for this version. Another TRITON_IMAGE with another Python fails here, by design.
ARG PYTHON_VERSION=3.10
WORKDIR /opt/hybridcn
COPY deploy/requirements-serve.txt /opt/hybridcn/deploy/requirements-serve.txt
RUN python${PYTHON_VERSION} -m pip install --no-cache-dir -r deploy/requirements-serve.txt
COPY pyproject.toml /opt/hybridcn/
COPY hybridcn /opt/hybridcn/hybridcn
COPY preprocessing /opt/hybridcn/preprocessing
COPY models /opt/hybridcn/models
COPY export /opt/hybridcn/export
COPY engine /opt/hybridcn/engine
COPY gateway /opt/hybridcn/gateway
COPY training /opt/hybridcn/training
COPY batch /opt/hybridcn/batch
RUN python${PYTHON_VERSION} -m pip install --no-cache-dir --no-deps .
