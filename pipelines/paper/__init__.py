"""The paper's experiments (Tables 2-6, Fig. 2 rate sweep, Fig. 5 defense curve) from nothing.

    python -m pipelines.paper --config pipelines/configs/quick.yaml --work runs/quick

`config` reads the YAML (datasets, goals, rates, models, epochs, defenses), `plan` turns it into
`mmsanitize` CLI steps with their outputs and dependencies, `run` executes the unfinished steps as
Dask tasks (independent runs side by side; a rerun skips finished steps), `render` writes the
results markdown and its plots from the run folders with `mmsanitize.report`'s table code.
Nothing is read from outside --work (datasets are built there, the backbone-feature cache lives
there).
"""
