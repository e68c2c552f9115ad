"""Operating tokenmill as a service."""
