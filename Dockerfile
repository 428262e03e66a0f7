# The gateway image (also runs the mock backend: `python -m backends.mock`).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY gateway ./gateway
COPY backends ./backends
COPY migrations ./migrations
COPY config ./config
RUN pip install --no-cache-dir . && useradd --system --uid 10001 gateway && mkdir -p /app/data && chown gateway /app/data
ENV GATEWAY_MIGRATIONS_DIR=/app/migrations
USER gateway
EXPOSE 8080
CMD ["gateway", "serve", "--config", "/app/config/production.example.yaml"]
