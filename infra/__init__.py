"""Package data: work-pool base job templates and container/cluster examples (installed as ``driftloop.infra``)."""
