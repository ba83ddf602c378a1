"""Stages: one module per pipeline stage (extract / transform / load / run / main). A stage imports core only."""
