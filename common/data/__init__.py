"""Site data: readers for fastMRI / BraTS / IXI, scanner simulation, datasets, demo data."""
