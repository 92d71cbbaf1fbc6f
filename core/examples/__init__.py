"""Built-in example tasks (model and data factories) for demos and tests."""
