"""Model backbones (timm EfficientNets) and the loading of their pretrained weights."""
