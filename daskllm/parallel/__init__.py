"""The mesh and one module per strategy: a plan (which slice each rank holds) plus its seams; no Dask here."""
