# One image for both sides of apf-emu (the compose file runs it as the host service and as the guest service).
# BASE_IMAGE needs python3 >= 3.11 with venv: the official slim image by default, or the local Debian image that
# scripts/prepare-docker builds on a machine with no registry. If .docker/wheels holds a wheelhouse (made by that
# script) the dependencies come from it with no network; otherwise from the package index.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="apf-emu"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/apf-emu/bin:$PATH

COPY .docker/wheels /tmp/wheels
COPY pyproject.toml README.md /src/
COPY shared /src/shared
COPY host_daemon /src/host_daemon
COPY guest_agent /src/guest_agent
COPY apf_emu /src/apf_emu
RUN python3 -m venv /opt/apf-emu \
    && if ls /tmp/wheels/*.whl >/dev/null 2>&1 \
          && /opt/apf-emu/bin/pip install --quiet --no-index --find-links /tmp/wheels /src; then :; \
       else /opt/apf-emu/bin/pip install --quiet /src; fi \
    && rm -rf /tmp/wheels /root/.cache \
    && apf-emu --help >/dev/null && apf-host --help >/dev/null && apf-guest --help >/dev/null \
    && mkdir -p /run/apf-emu

# Both services override this; a bare `docker run IMAGE` prints the host's options.
CMD ["apf-host", "--help"]
