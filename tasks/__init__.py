"""The lifecycle's steps, one module per stage: plain typed functions with their Prefect
task wrappers (``*_task``) at the edge."""
