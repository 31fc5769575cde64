"""The pipeline's work, in the order it runs (one thin module per step, each with
``run_<step>(cfg, ws)`` and a ``main()`` that DVC or a CLI calls):

    ingest -> validate -> prepare -> train -> evaluate -> register -> gate -> promote

validate, prepare, train and evaluate are the DVC stages (dvc.yaml). The libraries they use
live in sub-packages: ``common`` (errors, workspace paths, files, config, the stage runner),
``data`` (landing zone, row and image checks, formats, splits, validation), ``model`` (the
training core: torch, timm and numpy only) and ``registry`` (MLflow, gate rules, aliases).
Nothing here imports Prefect: the wiring is in flows/.
"""
