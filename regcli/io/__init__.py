"""File input/output: images, transforms (ANTs formats), atomic writes."""
