"""Data preparation and loading: data.text (tiny shakespeare, characters or GPT-2 BPE) and
data.images (Fashion-MNIST, CIFAR-10, rendered digits). Each finds, downloads or falls back."""
