"""What every step shares: errors, workspace paths, files, config, the stage runner, DVC and metrics."""
