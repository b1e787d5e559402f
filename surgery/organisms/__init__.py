"""Model organisms: small random ViTs of every supported library with planted register neurons, and
images that trigger them. Test and demo fixtures (the demo uses vit.py); no library module imports them.
vit.py (the CLIP-style timm ViT, the planting, calibration images), families.py (open_clip, HF, DINOv2
hub), eva.py (timm Eva, open_clip timm trunks, HF DINOv3 / SigLIP), vlm.py (LLaVA / LLaVA-NeXT / PaliGemma),
onnx_graphs.py (exported ONNX files)."""
