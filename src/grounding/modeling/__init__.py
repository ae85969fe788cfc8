"""Models: image backbones, text encoders, region features, heads, their losses and training,
and the one path that scores pairs."""
