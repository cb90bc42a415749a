"""Two-stage TerraScope training (RES pretraining, Terra-CoT SFT); entry point ``model.train``."""
