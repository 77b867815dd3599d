"""Foundations below every other layer: the batch, modalities, masking, seeding, configs."""
