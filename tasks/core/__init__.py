"""Settings, typed errors, input loaders, MLflow setup and the transient-error predicate: imports nothing of the project."""
