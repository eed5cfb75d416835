# A Triton model repository as an image, for Kubernetes (deploy/kubernetes): an initContainer of the
# Triton, gateway and batch-worker pods copies /models into the pod. One image per repository target:
#   docker build -f deploy/models.Dockerfile --build-arg REPOSITORY=model_repository -t hybridcn-models:cpu .
#   docker build -f deploy/models.Dockerfile --build-arg REPOSITORY=model_repository_gpu -t hybridcn-models:gpu .
FROM busybox:1.37
ARG REPOSITORY=model_repository
COPY ${REPOSITORY} /models
