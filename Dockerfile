# One image for every fedkube component: global aggregator, combiners, workers
# (and, next, the operator). The chart and the operator run its `fedkube`
# entrypoint with the service's subcommand, e.g. `fedkube combiner --region eu ...`.
# Multi-stage: wheels are built in the first stage, the runtime stage has no
# compiler and runs as a non-root user.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core core
COPY aggregator aggregator
COPY workers workers
COPY operator operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin fedkube
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /home/fedkube
ENV PYTHONUNBUFFERED=1
EXPOSE 8080
ENTRYPOINT ["fedkube"]
CMD ["--help"]
