"""Core: config, storage, AWS clients, the Spark session, images, the backbone, costs. Imports nothing above it."""
