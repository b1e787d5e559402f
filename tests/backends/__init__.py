"""Each backend in and out: timm, open_clip, HF transformers (and its remote-modeling file), DINOv2, today's
backbones, the backend registry, real checkpoints through a fake offline hub."""
