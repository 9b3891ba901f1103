"""Config: the run's sections (sections.py), `Config` and its cross-checks (schema.py), and reading files, `--set`
overrides and dumping (files.py). Validating touches no disk, network or torch.distributed."""
