# The gateway image (also runs the mock backend: `python -m backends.mock`).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY gateway ./gateway
COPY backends ./backends
COPY migrations ./migrations
COPY config ./config
# The workers run with -OO (gateway/serve.py): compile their libraries' optimised bytecode once, here.
RUN pip install --no-cache-dir . \
    && python -OO -m compileall -q "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    && useradd --system --uid 10001 gateway && mkdir -p /app/data && chown gateway /app/data
ENV GATEWAY_MIGRATIONS_DIR=/app/migrations
USER gateway
EXPOSE 8080
CMD ["gateway", "serve", "--config", "/app/config/production.example.yaml"]
