"""Distillers: PAT and the baselines it is compared with (build.py builds one by name)."""

# every --distiller choice, here so that the run configuration names them without importing the models
DISTILLERS = ("pat", "kd", "ofa", "dkd", "dist", "fitnet", "none")
