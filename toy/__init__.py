"""The toy world ACE is measured on where no Stable Diffusion weights can be had.

- `world`: procedural 16x16 pictures of shapes, colours, fill styles and made-up named entities,
  and the vocabulary (`vocabulary.json`) the toy model learns to draw them from;
- `model`: the toy text-to-image model as ComfyUI objects (MODEL, CLIP, VAE), in two variants
  whose text encoder reads causally (like CLIP) or both ways; needs a running ComfyUI;
- `classifier`: the judge, a small CNN that says which object, colour and style a picture shows;
- `train`: how the toy model's weights (`weights/`) were made.

`world` and `classifier` are plain torch and import anywhere.
"""

# How to sample the toy model (it was tuned with these; any ComfyUI sampler works): KSampler
# settings, and the EmptyLatentImage size whose 16x16 latent grid is its pixel grid.
SAMPLER = {"sampler_name": "euler", "scheduler": "karras", "steps": 20, "cfg": 3.0}
IMAGE_SIZE = 128
# The toy model the node, the command line and the demo load unless told otherwise.
DEFAULT_MODEL = "causal"
