"""Segmentation: segmenters (Cellpose 3.x/4.x adapter, watershed baseline), tiling, lazy plate labels."""
