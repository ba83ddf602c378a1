"""Fruits!: fruit photos to compact feature vectors, locally or on AWS EMR."""
