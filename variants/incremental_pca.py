"""Incremental PCA (Ross et al. 2008, "Incremental Learning for Robust Visual Tracking", IJCV 77,
the mean-corrected update of scikit-learn's IncrementalPCA) as EVA runs it on layer inputs.

For each new batch X_t (n_t x d), with the running mean μ, variance and singular triplets
(S, V) of everything seen so far (n samples):

    first batch:   X_t − μ_t                                   (μ_t its own mean)
    later batches: [ diag(S) Vᵀ ;  X_t − mean(X_t) ;  sqrt(n·n_t/(n+n_t)) · (μ − mean(X_t)) ]

and the top singular triplets of that stack are the principal directions of all the data
seen, centred on the updated mean. `explained_variance_ratio_ = S² / (Σ var · n_total)`.

This is a port, operation for operation, of PEFT 0.21.2's `peft/utils/incremental_pca.py`
(Apache-2.0, © the HuggingFace team; itself adapted from scikit-learn, BSD-3-Clause), restricted
to what EVA uses: `partial_fit` with `torch.svd_lowrank(q = 2·n_components, niter = 4)` drawn
under a forked RNG seeded with 42, and scikit-learn's sign convention (`svd_flip` on V). The
dtype flow is kept as PEFT has it, because the numbers depend on it: the running mean and
variance are float64, so from the second batch on the stacked matrix (and the SVD) is float64.
Keeping every operation identical is what makes EVA's convergence loop, which compares the
components of consecutive updates, take the same path as PEFT's (docs/init-data-aware.md).
"""

from __future__ import annotations

import torch


class IncrementalPCA:
    """Mean-centred incremental PCA with a seeded randomized SVD (see the module docstring)."""

    def __init__(self, n_components: int, *, lowrank_niter: int = 4, lowrank_seed: int = 42):
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        self.n_components = n_components
        self.lowrank_q = 2 * n_components
        self.lowrank_niter = lowrank_niter
        self.lowrank_seed = lowrank_seed
        self.fitted = False

    def _svd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # the draws of the randomized range finder come from a fixed seed, never from the caller's RNG
        with torch.random.fork_rng():
            torch.manual_seed(self.lowrank_seed)
            u, s, v = torch.svd_lowrank(x, q=self.lowrank_q, niter=self.lowrank_niter)
        return u, s, v.mH

    @staticmethod
    def _mean_and_var(x, last_mean, last_variance, last_count):
        """Chan et al.'s parallel update of mean and variance (float64 accumulators), as PEFT."""
        if x.shape[0] == 0:
            return last_mean, last_variance, last_count
        new_count = torch.tensor([x.shape[0]], device=x.device)
        count = last_count + new_count
        last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if last_mean is None \
            else last_mean * last_count
        new_sum = x.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / count
        centred = x - new_sum / new_count
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        centred.square_()
        new_unnormalized = centred.sum(dim=0, dtype=torch.float64)
        new_unnormalized -= correction / new_count
        if last_variance is None:
            variance = new_unnormalized / count
        else:
            last_unnormalized = last_variance * last_count
            ratio = last_count.double() / new_count
            variance = (last_unnormalized + new_unnormalized
                        + ratio / count * (last_sum / ratio - new_sum).square()) / count
        return mean, variance, count

    @staticmethod
    def _flip_signs(u: torch.Tensor, vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scikit-learn's svd_flip(u_based_decision=False): each row of Vᵀ gets its largest entry positive."""
        rows = torch.argmax(torch.abs(vt), dim=1)
        signs = torch.sign(vt[range(vt.shape[0]), rows])
        u *= signs[: u.shape[1]].view(1, -1)
        vt *= signs.view(-1, 1)
        return u, vt

    def partial_fit(self, x: torch.Tensor) -> None:
        """Fold one batch (n_samples x n_features, n_samples >= n_components) into the estimate."""
        x = x.clone()
        n_samples, n_features = x.shape
        if self.n_components > n_features:
            raise ValueError(f"n_components={self.n_components} is more than the {n_features} features")
        if self.n_components > n_samples:
            raise ValueError(f"n_components={self.n_components} is more than the {n_samples} samples of the batch")
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        first = not self.fitted
        if first:
            self.mean_ = self.var_ = None
            self.n_samples_seen_ = torch.tensor([0], device=x.device)
            self.n_features_ = n_features
        elif n_features != self.n_features_:
            raise ValueError(f"a batch of {n_features} features after batches of {self.n_features_}")
        mean, var, total = self._mean_and_var(x, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            x -= mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            factor = torch.sqrt((self.n_samples_seen_.double() / total) * n_samples)
            x = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, x,
                              factor * (self.mean_ - batch_mean)))
        u, s, vt = self._svd(x)
        u, vt = self._flip_signs(u, vt)
        ratio = s ** 2 / torch.sum(var * total)
        self.n_samples_seen_ = total
        self.components_ = vt[: self.n_components]
        self.singular_values_ = s[: self.n_components]
        self.mean_ = mean
        self.var_ = var
        self.explained_variance_ratio_ = ratio[: self.n_components]
        self.fitted = True
