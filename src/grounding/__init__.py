"""Phrase grounding on Flickr30k Entities: the library behind the DVC pipeline's stages."""
