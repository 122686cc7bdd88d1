"""intercept: send your own requests to a Kubernetes service to the process on your machine.

The public Python API is listed here once; the CLI, the tests, VS Code tasks and CDE
hooks all call it.
"""

__version__ = "0.1.0"
