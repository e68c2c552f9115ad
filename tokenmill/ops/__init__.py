"""Operating tokenmill as a service: tenants and their limits (tenants.py)."""
