"""What is done with stored profiles: QC, whitening, classic features, export, report."""
