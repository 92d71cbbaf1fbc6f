# fedkube's two images, from one file:
#
#   --target full  fedkube:<version>       the workers and the global aggregator: torch
#                                          (its Linux wheel brings the CUDA libraries, so the
#                                          same image trains on GPU nodes) and every dependency
#   --target slim  fedkube-slim:<version>  the operator and the regional combiners: no torch,
#                                          no training stack ([tool.fedkube.image] in
#                                          pyproject.toml lists what it leaves out)
#
# `scripts/build-images.sh` builds both with podman, from a Debian base that it makes
# itself (mmdebstrap), with no container registry; tests/realnode/test_images.py builds them and
# runs them. With a registry at hand, `docker build --target full .` works as it is.
#
# Layers are ordered so that a code change rebuilds in seconds: the dependencies (from
# pyproject.toml's declared list, pip's cache as a build cache mount) are one layer that
# changes only with pyproject.toml; fedkube itself is a small layer on top. The runtime
# virtualenvs are created without pip and filled from outside with `pip --python`, so no
# pip, no compiler and no pip configuration is left in an image. Both run as UID 10001 and
# work with a read-only root filesystem (every pod mounts an emptyDir at /tmp, HOME=/tmp);
# every module is precompiled (unchecked-hash .pyc), since a read-only image cannot cache
# bytecode and a worker would otherwise recompile torch at every start.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm

# ---- build stages -----------------------------------------------------------------------
# The requirement lists, derived from pyproject.toml. The stages below copy only these
# lists: an edit to pyproject.toml that leaves the dependencies alone (a pytest option, a
# version bump) leaves the lists, and so the 6.7 GB dependency layer, as they were.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /src/pyproject.toml
COPY scripts/image-requirements.py /src/scripts/image-requirements.py
RUN mkdir /requirements \
 && for image in build full slim; do \
      python3 /src/scripts/image-requirements.py "$image" > "/requirements/$image.txt" || exit 1; \
    done

# pip and fedkube's build backend, in a virtualenv of their own that no image keeps.
FROM ${BASE_IMAGE} AS tools
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_WARN_SCRIPT_LOCATION=1
COPY --from=requirements /requirements/build.txt /requirements/build.txt
RUN --mount=type=cache,id=fedkube-pip,target=/root/.cache/pip \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3 -m venv /opt/pip \
 && /opt/pip/bin/pip install --quiet -r /requirements/build.txt

# ---- runtime images ---------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
RUN groupadd --gid 10001 fedkube \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin fedkube
ENV PATH=/opt/fedkube/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
# 8080: round protocol (aggregator, combiners); 9090: worker /metrics; 8000: operator /metrics.
EXPOSE 8080 9090 8000
ENTRYPOINT ["fedkube"]
CMD ["--help"]

# One virtualenv per image, installed in place by a pip that lives in /tmp for the one step
# (Debian's ensurepip; nothing of it stays in the layer): the 6.7 GB dependency layer is
# written once and is the image's own. (Built in a stage of its own and copied into the
# runtime, it was written twice, and a build needed twice the disk: a fresh machine with
# 25 GB free ran out.) The requirement list is copied in, so that a change to it
# invalidates podman's layer cache; it stays in the image as the record of what was
# installed. Where TLS to the package index goes through a proxy with its own certificate
# authority, pass its bundle as the build secret `ca-bundle` (build-images.sh passes
# pip's). compileall skips test folders and the files written for a newer Python than the
# image's (torch ships py312-only syntax under torch/testing/_internal).
FROM runtime AS deps-full
COPY --from=requirements /requirements/full.txt /opt/fedkube-requirements.txt
RUN --mount=type=cache,id=fedkube-pip,target=/root/.cache/pip \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3 -m venv /tmp/pip && python3 -m venv --without-pip /opt/fedkube \
 && PIP_DISABLE_PIP_VERSION_CHECK=1 /tmp/pip/bin/pip --python /opt/fedkube/bin/python \
      install --quiet --no-compile -r /opt/fedkube-requirements.txt \
 && rm -rf /tmp/pip \
 && /opt/fedkube/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
      -x '/(tests?|testing/_internal)/|/py3[0-9]+_' /opt/fedkube/lib

FROM runtime AS deps-slim
COPY --from=requirements /requirements/slim.txt /opt/fedkube-requirements.txt
RUN --mount=type=cache,id=fedkube-pip,target=/root/.cache/pip \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3 -m venv /tmp/pip && python3 -m venv --without-pip /opt/fedkube \
 && PIP_DISABLE_PIP_VERSION_CHECK=1 /tmp/pip/bin/pip --python /opt/fedkube/bin/python \
      install --quiet --no-compile -r /opt/fedkube-requirements.txt \
 && rm -rf /tmp/pip \
 && /opt/fedkube/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
      -x '/tests?/' /opt/fedkube/lib

# fedkube itself, staged under /stage as the files it adds to /opt/fedkube (the package, its
# dist-info, the `fedkube` script). Its dependencies are the images' business (--no-deps),
# so both images take the same stage; it is built offline, with the tools stage's backend,
# in a virtualenv at the runtime's path so that the script's interpreter line is right.
FROM tools AS app
COPY pyproject.toml README.md /src/
COPY core /src/core
COPY aggregator /src/aggregator
COPY workers /src/workers
COPY operator /src/operator
RUN /opt/pip/bin/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir /tmp/wheel /src \
 && python3 -m venv --without-pip /opt/fedkube \
 && /opt/pip/bin/pip --python /opt/fedkube/bin/python install --no-index --no-compile --no-deps \
      /tmp/wheel/fedkube-*.whl \
 && site=$(/opt/fedkube/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
 && /opt/fedkube/bin/python -m compileall -q --invalidation-mode unchecked-hash "$site/fedkube" \
 && mkdir -p "/stage$site" /stage/opt/fedkube/bin \
 && mv "$site/fedkube" "$site"/fedkube-*.dist-info "/stage$site/" \
 && mv /opt/fedkube/bin/fedkube /stage/opt/fedkube/bin/

FROM deps-slim AS slim
LABEL org.opencontainers.image.title="fedkube-slim" \
      org.opencontainers.image.description="fedkube's operator and regional combiners (no training stack)"
COPY --from=app /stage/ /
USER 10001:10001

FROM deps-full AS full
LABEL org.opencontainers.image.title="fedkube" \
      org.opencontainers.image.description="Federated learning on Kubernetes: workers, aggregators, operator"
COPY --from=app /stage/ /
USER 10001:10001
