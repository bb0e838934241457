"""Read-only views of a run directory: terminal table (``table``), PNG plots (``plots``) and a live web
dashboard (``dashboard``, with ``access`` for its token). All three load a run the same way
(:func:`server.viewer.run_view.load_run`) and flatten metrics into the same rows
(:data:`server.viewer.run_view.COLUMNS`), so a number is identical wherever it is shown.
"""
