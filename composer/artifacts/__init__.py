"""A built mixture as an artifact: load, generate, export (with its manifest), port."""
