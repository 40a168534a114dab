"""Measuring and evaluating the engine: speed against the baselines (speed.py), accuracy on
RULER-style tasks (accuracy.py, tasks.py), a device's rates (calibration.py), jobs of mixed
lengths (mixed_job.py) and their predictions (job_prediction.py), and the files and plots
they leave (results.py, plots.py). It uses the runtime; the runtime uses nothing of it."""
