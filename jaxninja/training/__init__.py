"""The training tool: the lecture's model trained by compiled loops, saved as run directories.

- ``jaxninja.training.train``: ``TrainConfig``, the backends, one step and compiled chunks
  of steps (``make_train_chunk``, ``run_chunks``), calibration and evaluation.
- ``jaxninja.training.job``: a whole run (``train_run``, ``eval_run``): data -> chunks ->
  checkpoints -> metrics -> samples.
- ``jaxninja.training.rundir``: the run directory: claimed, locked, stopped cleanly.
- ``jaxninja.training.checkpoint``: a run's state saved and loaded (``.npz``, validated).
- ``jaxninja.training.fileio``: ``write_atomic``, the one way a file is written.
- ``jaxninja.training.parallel``: device meshes and multi-process jobs.
- ``jaxninja.training.metrics``: evaluation during training (``metrics.jsonl``).
- ``jaxninja.training.sweep``: grids over config fields, each member a run directory.
- ``jaxninja.training.compare``: runs side by side.
- ``jaxninja.training.diagnose``: saturation, dead units, gradient and update ratios.
"""
