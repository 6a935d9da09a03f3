"""`make study`: ST-AR vs LlamaGen on Fashion-MNIST through the project's own stage commands."""
