"""Settings, typed errors, input loaders, MLflow setup, process checks and the transient-error predicate.

Imports nothing of the project.
"""
