"""Training: staged schedule, engine (train_one_epoch / evaluate), checkpoints, Ray Train trainer."""
