"""rlrank as a service (``rlrank-serve``): a jobs API over HTTP, a job table in SQLite, searches run
as separate processes (or Ray tasks), and a live dashboard. Needs ``pip install "rlrank[serve]"``.

Rooms: :mod:`~rlrank.service.job_options` (a request's options -> the ``rlrank-search`` command,
validated by the command's own code, paths kept inside the runs folder),
:mod:`~rlrank.service.job_store` (the SQLite job table), :mod:`~rlrank.service.launchers` (a job as a
process or a Ray task), :mod:`~rlrank.service.job_main` (a job's process: search, then analysis), :mod:`~rlrank.service.scheduler` (the queue: how many at once, restarts),
:mod:`~rlrank.service.job_progress` (what a run folder says of a job),
:mod:`~rlrank.service.auth` (the bearer token), :mod:`~rlrank.service.app` (the FastAPI routes and
the dashboard page).
"""
