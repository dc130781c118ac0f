"""Fleet-side helpers that run on the server machine (simulated fleets; provisioning later)."""
