"""The runner: ``lt.run`` and its hooks and loggers."""
