"""The Dask side: rank actors, placement on workers, start-up, time-outs, shutdown."""
