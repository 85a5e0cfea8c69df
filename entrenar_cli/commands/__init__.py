"""One module per command; each exposes ``register(app)`` and imports heavy code lazily."""
