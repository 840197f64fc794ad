"""HTTP routes, one module per area: pooling.py holds `POST /pooling` and `/invocations`."""
