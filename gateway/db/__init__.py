"""SQL storage: table definitions (`schema`) and engine creation (`engine`). Alembic owns schema changes."""
