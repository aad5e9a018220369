"""denovo3d: de novo 3D initial models from cryo-ET subtomograms.

Gradient-driven (VDAM-style) reconstruction from RELION 4/5 pseudo-subtomograms, followed by
symmetry alignment. See docs/architecture.md for the map of the package.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
