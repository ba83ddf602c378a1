"""Build tooling above every layer (never imported by the package): the DVC pipelines' writer."""
