"""Checkpoint conversion (official releases -> Orbax) and Orbax loading."""
