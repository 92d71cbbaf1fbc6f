# One image for every fedkube component: the operator, the global aggregator,
# the regional combiners and the workers. The chart and the operator run its
# `fedkube` entrypoint with the component's subcommand (`fedkube operator ...`,
# `fedkube combiner --region eu ...`); tests/unit/test_image.py checks that the
# entrypoint, the user and the base stay what the chart and the operator expect.
#
# Multi-stage: the first stage builds a virtual environment (with a compiler
# available for any sdist); the runtime stage copies only that environment,
# has no pip cache, no compiler, and runs as UID 10001 with a read-only root
# filesystem (every pod mounts an emptyDir at /tmp, HOME=/tmp).
#
# The base is pinned to a patch release; pin it by digest as well
# (`python:3.11.11-slim-bookworm@sha256:...`) in the registry you build from.
# torch's Linux wheel brings the CUDA libraries, so the same image runs on
# GPU nodes (the operator asks for the GPU; the NVIDIA runtime mounts the driver).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/fedkube
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core core
COPY aggregator aggregator
COPY workers workers
COPY operator operator
RUN /opt/fedkube/bin/pip install . \
 && find /opt/fedkube -name '__pycache__' -prune -exec rm -rf {} + \
 && /opt/fedkube/bin/python -m compileall -q /opt/fedkube/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="fedkube" \
      org.opencontainers.image.description="Federated learning on Kubernetes: operator, aggregators, workers"
RUN groupadd --gid 10001 fedkube \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin fedkube
COPY --from=build /opt/fedkube /opt/fedkube
ENV PATH=/opt/fedkube/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
# 8080: round protocol (aggregator, combiners); 9090: worker /metrics; 8000: operator /metrics.
EXPOSE 8080 9090 8000
ENTRYPOINT ["fedkube"]
CMD ["--help"]
