"""``nat-ray view``: a local web page over a run folder, for reading trajectories.

:mod:`~nat_ray.view.runs` finds what a run folder holds (trajectory sources, the results table,
plots, training samples) and nothing outside it; :mod:`~nat_ray.view.query` pages and filters the
Parquet parts on the server with pyarrow datasets, so a run of a million trajectories opens at
once; :mod:`~nat_ray.view.app` is the Starlette app (pages, the key login, files) that uvicorn
serves. No Ray: the viewer reads files only.
"""
