"""App: what answers users (identify a photo), on core and the artifacts the stages wrote; no Spark, no JVM."""
