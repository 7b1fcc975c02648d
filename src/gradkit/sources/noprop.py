"""NoProp (discrete time): each block learns, on its own, to denoise a noised label embedding given the input.

Paper: "NoProp: Training Neural Networks without Back-propagation or Forward-propagation" (Li, Teh &
Pascanu, 2025), the NoProp-DT variant. Time runs from noise (t = 0) to label (t = T). With class embeddings
``u_y = W_Embed[y]`` and a schedule ``ᾱ_0 < ᾱ_1 < … < ᾱ_T`` (``ᾱ_t`` = signal fraction of ``z_t``):

    q(z_t | y) = N(√ᾱ_t u_y, (1 − ᾱ_t) I),      SNR(t) = ᾱ_t / (1 − ᾱ_t)
    û_t(z_{t−1}, x) = softmax(f_t(x, z_{t−1})) W_Embed          (block t outputs class logits)
    L_t = (T/2)·η·(SNR(t) − SNR(t−1)) · mean_i ‖û_t(z_{t−1,i}, x_i) − u_{y_i}‖²,   z_{t−1,i} ~ q(z_{t−1} | y_i)
    L_out = mean_i −log p̂(y_i | z_{T,i}),  z_T ~ q(z_T | y)     (linear read-out p̂ = softmax(head(z)))
    L_KL  = mean_i KL(q(z_0 | y_i) ‖ N(0, I))

Block t's parameters get ``∇L_t`` only (its inputs x and z_{t−1} are not differentiated); the read-out gets
``∇L_out``; a learned embedding gets the gradient of the whole objective (it appears in every term, as in the
paper's update of θ_t, θ_out and W_Embed). Every step trains every block on the batch (the paper's algorithm
loops over t outside the mini-batch loop; per block, each update is the same gradient of L_t).

Inference chains the blocks from noise: z_0 ~ N(0, I),

    z_t = a_t û_t(z_{t−1}, x) + b_t z_{t−1} + √c_t ε_t,   ŷ = argmax head(z_T),

with a_t, b_t, c_t the mean coefficients and variance of the Gaussian posterior q(z_t | z_{t−1}, y) (the
forward process q(z_{t−1} | z_t) = N(√α_{t−1} z_t, (1 − α_{t−1}) I), α_{t−1} = ᾱ_{t−1}/ᾱ_t):

    a_t = √ᾱ_t (1 − α_{t−1}) / (1 − ᾱ_{t−1}),  b_t = √α_{t−1} (1 − ᾱ_t) / (1 − ᾱ_{t−1}),
    c_t = (1 − ᾱ_t)(1 − α_{t−1}) / (1 − ᾱ_{t−1}).

Class embeddings (the paper's options): ``"onehot"`` (fixed identity, d = C), ``"learned"`` (trained, any d,
initialised orthogonally), or a ``[C, d]`` tensor used as the initial value, e.g. :meth:`NoProp.prototypes`
(for each class the training example with the smallest median distance to the others of its class).

What we checked (the paper's loss terms and training algorithm as reproduced in a public re-implementation's
report, and the Gaussian algebra: read, not copied): the three loss terms and their weights (T/2·η, SNR
differences), sampling z_{t−1} from q for block t's input, the read-out on z_T ~ q(z_T | y), the softmax-weighted
embedding parameterisation of û, η = 0.1 and T = 10 as the paper's DT settings, the embedding options. The
posterior coefficients a_t, b_t, c_t are derived here and tested against Gaussian conditioning. The noise
schedule: the paper uses a fixed cosine schedule for NoProp-DT; we use the cosine form of "Improved DDPM"
(offset s = 0.008) with time reversed so that t = T is the least noisy, ᾱ_t = cos²(π/2 · (1 − t/T + s)/(1 + s))
(ᾱ_0 = 0, ᾱ_T ≈ 0.9998); pass ``alpha_bar=`` for another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_int, check_positive
from ._local import LocalRule, as_blocks

__all__ = ["NoProp", "cosine_alpha_bar"]


def cosine_alpha_bar(steps: int, s: float = 0.008, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """ᾱ_0 … ᾱ_T of the (time-reversed) cosine schedule: increasing from 0 (pure noise) to ≈ 1."""
    t = torch.arange(steps + 1, dtype=torch.float64)
    a = torch.cos(math.pi / 2 * (1 - t / steps + s) / (1 + s)).square()
    a[0] = 0.0
    return a.to(dtype)


class NoProp(LocalRule):
    """NoProp-DT as a gradient source: T denoising blocks trained independently, a linear read-out.

    Each block is a module called as ``block(x, z)`` with ``x`` the network input and ``z`` the noisy label
    embedding ``[B, d]``; it returns class logits ``[B, C]``. The closure returns ``(x, y)``. Returns
    ``L_out + L_KL + Σ_t L_t``.

    Args:
        blocks: the T denoising blocks (a list or ``nn.ModuleList``; each its own network, as in the paper).
        n_classes: C.
        embedding: ``"onehot"`` (default: fixed identity, d = C), ``"learned"`` (d = ``embedding_dim``,
            orthogonal initialisation) or a ``[C, d]`` tensor (initial value, e.g. :meth:`prototypes`).
        embedding_dim: d for ``embedding="learned"`` (default C).
        learn_embedding: train W_Embed (default: False for ``"onehot"``, True otherwise).
        eta: η, the weight of the denoising terms (default 0.1, the paper's DT setting).
        alpha_bar: the schedule ᾱ_0 … ᾱ_T as a tensor of T + 1 increasing values in [0, 1) (default: the
            cosine schedule of :func:`cosine_alpha_bar`).
        seed: seed of the noise stream and of the read-out / embedding initialisation.
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"`` (see :class:`LocalRule`).
    """

    paper = "NoProp: Training Neural Networks without Back-propagation or Forward-propagation"

    def __init__(self, blocks: Sequence[nn.Module], n_classes: int, *, embedding: str | torch.Tensor = "onehot",
                 embedding_dim: int | None = None, learn_embedding: bool | None = None, eta: float = 0.1,
                 alpha_bar: torch.Tensor | None = None, seed: int = 0, on_nonfinite: str = "raise"):
        if isinstance(blocks, nn.Sequential):
            raise ValueError("NoProp blocks are not chained: pass a list (or nn.ModuleList) of T modules, each "
                             "called as block(x, z)")
        blist = as_blocks(blocks)
        c = check_int("n_classes", n_classes, 2)
        seed = check_int("seed", seed, 0)
        first = next(iter(blist.parameters()), None)
        dtype = first.dtype if first is not None else torch.get_default_dtype()
        device = first.device if first is not None else torch.device("cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if isinstance(embedding, torch.Tensor):
                if embedding.dim() != 2 or embedding.shape[0] != c:
                    raise ValueError(f"embedding must be a [n_classes={c}, d] tensor, got {tuple(embedding.shape)}")
                w = embedding.detach().to(dtype=dtype, device=device).clone()
                learn = True if learn_embedding is None else bool(learn_embedding)
            elif embedding == "onehot":
                if embedding_dim not in (None, c):
                    raise ValueError(f"embedding_dim must be n_classes={c} for embedding='onehot', got {embedding_dim}")
                w = torch.eye(c, dtype=dtype, device=device)
                learn = False if learn_embedding is None else bool(learn_embedding)
            elif embedding == "learned":
                d = c if embedding_dim is None else check_int("embedding_dim", embedding_dim, 1)
                w = torch.empty(c, d, dtype=dtype, device=device)
                nn.init.orthogonal_(w)
                learn = True if learn_embedding is None else bool(learn_embedding)
            else:
                raise ValueError(f"embedding must be 'onehot', 'learned' or a [C, d] tensor, got {embedding!r}")
            head = nn.Linear(w.shape[1], c, dtype=dtype, device=device)
        aux = nn.Module()
        if learn:
            aux.embedding = nn.Parameter(w)
        else:
            aux.register_buffer("embedding", w)
        aux.head = head
        super().__init__(blist, aux, seed=seed, on_nonfinite=on_nonfinite)
        self.n_classes = c
        self.eta = check_positive("eta", eta)
        self.T = len(self.blocks)
        ab = cosine_alpha_bar(self.T) if alpha_bar is None else torch.as_tensor(alpha_bar, dtype=torch.float64)
        if ab.shape != (self.T + 1,):
            raise ValueError(f"alpha_bar must hold T + 1 = {self.T + 1} values (ᾱ_0 … ᾱ_T), got shape "
                             f"{tuple(ab.shape)}")
        if not bool(((ab >= 0) & (ab < 1)).all()) or not bool((ab[1:] > ab[:-1]).all()):
            raise ValueError("alpha_bar must increase strictly from ᾱ_0 >= 0 to ᾱ_T < 1 (t = T least noisy)")
        self.alpha_bar = ab

    # -- schedule ---------------------------------------------------------------------------------------------
    @property
    def embedding(self) -> torch.Tensor:
        """W_Embed ``[C, d]`` (rows are the class embeddings u_y)."""
        return self.aux.embedding

    @property
    def head(self) -> nn.Linear:
        """The linear read-out p̂(y | z_T)."""
        return self.aux.head

    def snr(self) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t), t = 0 … T (float64)."""
        return self.alpha_bar / (1 - self.alpha_bar)

    def weights(self) -> torch.Tensor:
        """The factor of block t's squared error, (T/2)·η·(SNR(t) − SNR(t−1)), t = 1 … T (float64)."""
        s = self.snr()
        return self.T / 2 * self.eta * (s[1:] - s[:-1])

    def posterior(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a_t, b_t, c_t), t = 1 … T: q(z_t | z_{t−1}, y) = N(a_t u_y + b_t z_{t−1}, c_t I) (float64)."""
        ab = self.alpha_bar
        cur, prev = ab[1:], ab[:-1]
        alpha_prev = prev / cur  # α_{t−1}
        a = cur.sqrt() * (1 - alpha_prev) / (1 - prev)
        b = alpha_prev.sqrt() * (1 - cur) / (1 - prev)
        c = (1 - cur) * (1 - alpha_prev) / (1 - prev)
        return a, b, c

    # -- training ---------------------------------------------------------------------------------------------
    def draw_noise(self, u: torch.Tensor) -> torch.Tensor:
        """``[T + 1, B, d]`` standard normal draws: row t−1 noises block t's input z_{t−1}, row T the read-out's
        z_T (the draw ``estimate`` makes)."""
        return torch.randn((self.T + 1, *u.shape), generator=self.generator, dtype=u.dtype).to(u.device)

    def denoise(self, t: int, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """û_t(z, x) = softmax(block_t(x, z)) W_Embed, for t = 1 … T."""
        logits = self.blocks[t - 1](x, z)
        if logits.shape != (z.shape[0], self.n_classes):
            raise ValueError(f"NoProp block {t} must return logits [B, n_classes={self.n_classes}], got "
                             f"{tuple(logits.shape)}")
        return logits.softmax(-1) @ self.embedding

    def noised(self, t: int, u: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """A draw of z_t ~ q(z_t | y): √ᾱ_t u + √(1 − ᾱ_t) ε."""
        a = float(self.alpha_bar[t])
        return math.sqrt(a) * u + math.sqrt(1 - a) * eps

    def kl(self, u: torch.Tensor) -> torch.Tensor:
        """mean_i KL(N(√ᾱ_0 u_i, (1 − ᾱ_0) I) ‖ N(0, I))."""
        a0 = float(self.alpha_bar[0])
        d = u.shape[1]
        const = 0.5 * d * ((1 - a0) - 1 - math.log(1 - a0))
        return 0.5 * a0 * u.square().sum(1).mean() + const

    def _local_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        emb_params = self._trainable_embedding()
        eps = self.draw_noise(self.embedding[y].detach())
        total = None
        x_in = x.detach()
        for t in range(1, self.T + 1):
            u = self.embedding[y]  # indexed afresh per loss: each local graph is freed after its gradient
            z = self.noised(t - 1, u, eps[t - 1]).detach()
            u_hat = self.denoise(t, x_in, z)
            loss = float(w[t - 1]) * (u_hat - u).square().sum(1).mean()
            total = loss.detach() if total is None else total + loss.detach()
            self._grad(loss, self._trainable(self.blocks[t - 1]) + emb_params, f"block {t}")
        # The read-out and the prior term: z_T ~ q(z_T | y) by reparameterisation, so a learned embedding also
        # learns to be decodable and close to the prior.
        u = self.embedding[y]
        z_t = self.noised(self.T, u, eps[self.T])
        loss = F.cross_entropy(self.head(z_t), y) + self.kl(u)
        total = total + loss.detach()
        self._grad(loss, self._trainable(self.head) + emb_params, "the read-out")
        return total

    def _trainable_embedding(self) -> list[torch.Tensor]:
        e = self.aux.embedding
        return [e] if isinstance(e, nn.Parameter) and e.requires_grad else []

    # -- inference --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, x: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Read-out logits after the inference chain z_0 → z_T (``sample=False``: no noise, z_0 = 0)."""
        a, b, c = self.posterior()
        e = self.embedding
        shape = (x.shape[0], e.shape[1])
        gen = generator if generator is not None else torch.Generator().manual_seed(self.seed + 1)
        z = torch.randn(shape, generator=gen, dtype=e.dtype).to(e.device) if sample else e.new_zeros(shape)
        for t in range(1, self.T + 1):
            u_hat = self.denoise(t, x, z)
            z = float(a[t - 1]) * u_hat + float(b[t - 1]) * z
            if sample:
                z = z + math.sqrt(float(c[t - 1])) * torch.randn(shape, generator=gen, dtype=e.dtype).to(e.device)
        return self.head(z)

    def predict(self, x: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        """argmax of :meth:`logits`."""
        return self.logits(x, sample=sample, generator=generator).argmax(1)

    @staticmethod
    def prototypes(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
        """``[C, features]``: per class, the example whose median distance to the other examples of its class is
        smallest (the paper's prototype initialisation of W_Embed)."""
        flat = x.reshape(x.shape[0], -1)
        rows = []
        for k in range(n_classes):
            members = flat[y == k]
            if members.shape[0] == 0:
                raise ValueError(f"class {k} has no example: cannot build its prototype")
            if members.shape[0] == 1:
                rows.append(members[0])
                continue
            d = torch.cdist(members.to(torch.float64), members.to(torch.float64))
            d.fill_diagonal_(float("nan"))  # distances to the *other* members
            rows.append(members[d.nanmedian(1).values.argmin()])
        return torch.stack(rows)
