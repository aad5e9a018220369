"""Geometry of the field: RELION Euler angles, orientation grids, point groups."""
