"""Glue shared by the DVC stage scripts: data readers, schemas, metrics, base-model loading."""
