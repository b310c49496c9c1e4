"""The MLflow record: result schema, store access, every write, signal-safe writes."""
