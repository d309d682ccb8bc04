"""The experiments layer: reports on finished runs and sweeps, never imported by training.

`commands` (what eval.py runs), `run_report` (+ `poi_report`, `rewards_report`) for one run,
`comparison` for one sweep, `results_page` (+ `sweeps`, `page_spec`, `page_sections`) for a folder
of sweeps, `columns` for table columns and `render` for every figure and table.
"""
