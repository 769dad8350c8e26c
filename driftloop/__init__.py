"""driftloop core: settings, dataset spec, artifact store and model registry.

Flows (``flows/``) wire tasks (``tasks/``); both build on this package, never the
other way round.
"""

__version__ = "0.1.0"
