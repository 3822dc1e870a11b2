from alembic import context

from zerotouch.storage.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - migrations always run through zerotouch.storage.migrate
    raise RuntimeError("run migrations with `zerotouch db upgrade` or zerotouch.storage.migrate")
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
