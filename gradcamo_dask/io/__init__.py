"""Plates in and out: OME-Zarr HCS (0.4, 0.5), plain Zarr, TIFF, platemaps, synthetic plates, output URLs."""
