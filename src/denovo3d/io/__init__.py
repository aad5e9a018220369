"""File formats of the field: STAR tables (via starfile) and MRC maps (via mrcfile)."""
