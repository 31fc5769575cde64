"""The MLflow model registry: tracking, lineage, the promotion gate's rules and alias moves with their audit log."""
