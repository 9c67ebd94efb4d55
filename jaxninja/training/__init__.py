"""The training tool: the lecture's model trained by compiled loops, saved as run directories.

- :mod:`~jaxninja.training.train`: ``TrainConfig``, the backends, one step and compiled chunks
  of steps (``make_train_chunk``, ``run_chunks``), calibration and evaluation.
- :mod:`~jaxninja.training.job`: a whole run (``train_run``, ``eval_run``): data -> chunks ->
  checkpoints -> metrics -> samples.
- :mod:`~jaxninja.training.rundir`: the run directory: claimed, locked, stopped cleanly.
- :mod:`~jaxninja.training.checkpoint`: a run's state saved and loaded (``.npz``, validated).
- :mod:`~jaxninja.training.fileio`: ``write_atomic``, the one way a file is written.
- :mod:`~jaxninja.training.parallel`: device meshes and multi-process jobs.
- :mod:`~jaxninja.training.metrics`: evaluation during training (``metrics.jsonl``).
- :mod:`~jaxninja.training.sweep`: grids over config fields, each member a run directory.
- :mod:`~jaxninja.training.compare`: runs side by side.
- :mod:`~jaxninja.training.diagnose`: saturation, dead units, gradient and update ratios.
"""
