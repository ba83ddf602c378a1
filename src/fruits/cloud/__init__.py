"""Cloud: the project bucket, the EMR cluster, and the runner that submits a stage as an EMR step."""
