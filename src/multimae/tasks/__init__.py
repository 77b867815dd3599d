"""The tasks that run on the engine (:mod:`multimae.engine`): pretraining, fine-tuning and linear
probing, each owning its model building, objective, loader, evaluation and checkpoint metadata."""
