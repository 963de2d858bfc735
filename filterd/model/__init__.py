"""The model layers: tokenizers and model families (family.py, gpt2.py, registry.py), then
the checkpoint file, pretrained weights, int8, and the classifier that scores with them."""
