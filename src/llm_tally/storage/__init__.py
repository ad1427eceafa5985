"""The SQLModel store: schema, engine set-up, background writer and queries."""
