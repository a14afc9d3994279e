"""`harmony export`: a run's encoders for other libraries, checked against each library's model (keys and
shapes, built on the meta device) before anything is written, so an incompatible version fails here rather
than in the user's code.

- `to_timm`: the vision tower as one safetensors file under timm's ViT names, with a JSON sidecar holding the
  exact `timm.create_model` call (also a timm `config.json`);
- `to_open_clip`: both towers as an open_clip `local-dir:` folder that may be moved;
- `to_hf`: a transformers folder (`CLIPModel`, `CLIPVisionModel`, or `ViTModel` for a plain ViT alone) with
  CLIP's tokenizer;
- `cli`: the command.
"""
