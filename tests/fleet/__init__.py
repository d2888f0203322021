"""The fleet\x27s learned limits: simulation and generated checks."""
