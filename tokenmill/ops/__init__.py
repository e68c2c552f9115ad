"""Operating tokenmill as a service: tenants and their limits (tenants.py), energy and cost per request (energy.py)."""
