# One image for every service; the command picks the service (see docker-compose.yml).
# Models ship inside pip packages (Whisper tiny.en, the piper voice) and the page's npm assets
# are vendored at build time, so a container never downloads anything at run time.

FROM node:20-bookworm-slim AS frontend
WORKDIR /src/frontend
COPY frontend/package.json frontend/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error \
 && test -f node_modules/livekit-client/dist/livekit-client.umd.js

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE requirements-nodeps.txt ./
COPY common common
COPY gateway gateway
COPY stt_service stt_service
COPY avatar_service avatar_service
COPY avatar_stack avatar_stack
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip && /opt/venv/bin/pip install . \
 && /opt/venv/bin/pip install --no-deps -r requirements-nodeps.txt

FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=app:app frontend frontend
COPY --from=frontend --chown=app:app /src/frontend/node_modules/livekit-client/dist frontend/node_modules/livekit-client/dist
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 GATEWAY_HOST=0.0.0.0 GATEWAY_PORT=8000
USER app
EXPOSE 8000
# The installed package does not carry the page: tell the gateway where it is.
ENV FRONTEND_DIR=/app/frontend
CMD ["avatar-stack", "gateway"]
