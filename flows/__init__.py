"""Prefect flows, their tasks and the `llmhost` CLI over the lifecycle steps in tasks/."""

from flows.secrets import install as _install_secret_reader

_install_secret_reader()  # the HF token may live in a Prefect Secret block, which only flows/ may read
