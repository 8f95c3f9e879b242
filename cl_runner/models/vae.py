"""The variational autoencoder that deep generative replay trains beside its classifier (van de Ven & Tolias
2019, `preprints` branch: vae_models.AutoEncoder with --fc-bn=no): a fully connected encoder (784-400-400 on
MNIST, ReLU) to the mean and log-variance of a z_dim Gaussian, a mirrored decoder (z-400-400-784, ReLU, sigmoid
output), PyTorch's default initialisation. Its classifier head is unused for replay and left out."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(dims: list) -> nn.Sequential:
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class VAE(nn.Module):
    def __init__(self, input_shape: tuple, hidden: list, z_dim: int):
        super().__init__()
        self.input_shape, self.z_dim = tuple(input_shape), z_dim
        n = math.prod(input_shape)
        self.encoder = _mlp([n, *hidden])
        self.to_mu, self.to_logvar = nn.Linear(hidden[-1], z_dim), nn.Linear(hidden[-1], z_dim)
        self.decoder = nn.Sequential(_mlp([z_dim, *hidden[::-1]]), nn.Linear(hidden[0], n), nn.Sigmoid())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(len(z), *self.input_shape)

    def noise(self, n: int) -> torch.Tensor:
        """The reparameterisation's N(0, I) draws for a batch of n (the global RNG, as `randn_like` in `loss`)."""
        return torch.randn(n, self.z_dim, device=self.to_mu.weight.device)

    def loss(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction (binary cross-entropy per pixel, averaged over pixels) + KL divergence to N(0, I) divided
        by the number of pixels (the code's `average=True`), both averaged over the batch. `eps`: the
        reparameterisation's noise drawn beforehand (`noise`), so that the loss itself draws none."""
        h = self.encoder(x.flatten(1))
        mu, logvar = self.to_mu(h), self.to_logvar(h)
        eps = torch.randn_like(mu) if eps is None else eps
        z = mu + eps * (0.5 * logvar).exp()  # reparameterisation
        recon = F.binary_cross_entropy(self.decoder(z), x.flatten(1), reduction="none").mean(1).mean()
        kl = (-0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(1)).mean() / x[0].numel()
        return recon + kl

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n images decoded from z ~ N(0, I) (the global RNG: checkpoints carry its state)."""
        return self.decode(self.noise(n))
