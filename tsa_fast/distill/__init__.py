"""The distillation engine: its option sections (config), data, batches, teachers and their top-k cache, the
objective, the training loop (Distiller), evaluation, metrics, checkpoint files, and the protocols of its seams
(protocols). It imports no recipe (`tsa_fast.recipes`) and no integration (`tsa_fast.integrations`)."""
