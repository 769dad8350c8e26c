"""driftloop's Prefect Block types."""
