"""Code that runs inside a Ray cluster for the `ray` serving target (see `replica.py`).

It is shipped to the cluster as a Ray `py_modules` package and imports only what the serving environment has
(ray, fastapi, httpx, psutil): never the control plane's `tasks`, which needs packages that environment lacks.
"""
