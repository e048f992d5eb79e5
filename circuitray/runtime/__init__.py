"""Ray-aware orchestration: the only library package (with cli.py) that imports Ray.

It lives inside the package, not only under jobs/, because the installed `circuitray`
command must run the same stages without the repository checkout; jobs/*.py stay thin
entrypoints over these functions for `ray job submit`.
"""
