"""The training core: model building, cached features, the training loop and predictions.

Imports only torch, torchvision, timm and numpy (plus tasks.common's small pure modules), so it
runs on a GPU machine that has none of the orchestration stack."""
