"""Package data: dataset specs and monitoring policies that deployments point at (installed as ``driftloop.deployments``)."""
