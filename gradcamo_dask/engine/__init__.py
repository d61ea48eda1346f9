"""The model side: 3D CNNs, layer lookup, bundles, crop normalisation and augmentation, one-pass
explain, Grad-CAMO (Eq. 5) and its training regulariser."""
