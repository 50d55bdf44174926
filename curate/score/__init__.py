"""Image quality scores: one open_clip pass per image (CLIP score), and aesthetic / NSFW / watermark heads on its
embedding."""
