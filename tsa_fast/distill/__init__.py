"""The distillation engine: recipes (config), data, the training loop (Distiller), evaluation, the main job."""
