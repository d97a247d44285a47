"""The transformer as plain array math over numpy or cupy, written once; no Dask here."""
