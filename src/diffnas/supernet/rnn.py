"""Recurrent cells of the DARTS RNN space and the language model around them.

The cell (Liu et al., 2019, after ENAS): the input node is a highway-gated map of
``x_t`` and ``h_{t-1}``; each intermediate node ``i`` computes, from a predecessor state
``s``, ``[c, h] = s @ W_i`` and ``s + sigmoid(c) * (op(h, s) - s)``; the cell output (the
new hidden state) is the mean of the intermediate nodes. ``W_i`` belongs to the node and
is shared by its candidate ops and predecessors, as in the paper's code.

- :class:`SearchCell` mixes every (predecessor, op) pair with relaxed weights and
  normalises each node with batch statistics (affine-free BatchNorm, no running stats),
  in eval mode too: its outputs depend on the other sequences of the batch, and a batch
  needs at least 2 sequences.
  It can *grow*: intermediate nodes beyond ``active_nodes`` are skipped, and a node added
  by :meth:`SearchCell.grow` enters the output average with weight (``maturity``) 0, so
  the cell computes exactly the same function right after growth (a function-preserving
  morphism: the new node's outgoing weight starts at zero); a schedule then fades it in.
- :class:`FixedCell` follows a genotype (one (predecessor, op) pair per node).
- ``backbone="two_input"`` makes ``x_t`` and ``h_{t-1}`` two separate input nodes
  (node 0 and 1) instead of the gated initial node.

Dropout follows the DARTS/AWD-LSTM recipe: embedding dropout (whole words), variational
("locked") dropout on the embeddings, on ``x_t``/``h_{t-1}`` inside the cell and on the
outputs, and optional weight drop (DropConnect) on the recurrent matrices. All masks of a
forward pass come from one generator seeded by ``LmInput.seed`` when given, so repeated
evaluations of the same batch (virtual steps, finite differences) see the same masks.
Under data parallelism (``LmInput.columns`` = (rank, world size)) a batch holds one
contiguous block of the global batch's columns: every rank draws each mask in the global
batch's shape, in the same order from the same seed, and keeps its own block, so the
ranks together apply exactly the masks one process draws for the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diffnas.genotype import Genotype
from diffnas.ops.rnn import create_rnn_op
from diffnas.supernet.mixed import unsampled_weights

INIT_RANGE = 0.04  # uniform init of the cell matrices (DARTS)
EMB_INIT_RANGE = 0.1  # uniform init of the embedding (DARTS / AWD-LSTM)
BACKBONES = ("single", "two_input")


class LmInput(NamedTuple):
    tokens: torch.Tensor  # (T, B) token ids, time-major
    hidden: torch.Tensor  # (B, nhid) state carried over from the previous window
    seed: int | None = None  # dropout-mask seed; None draws from the global RNG
    # (rank, world size): the batch is block ``rank`` of ``world size`` equal contiguous
    # blocks of a global batch's columns (``data.text.shard_columns``); masks follow suit
    columns: tuple[int, int] = (0, 1)


class LmOutput(NamedTuple):
    logits: torch.Tensor  # (T, B, V)
    hidden: torch.Tensor  # (B, nhid) last state, to carry into the next window
    raw: torch.Tensor  # (T, B, nhid) cell outputs (for temporal activation regularization)
    dropped: torch.Tensor  # (T, B, nhid) after output dropout (for activation regularization)


@dataclass
class Dropouts:
    """Drop probabilities (DARTS names): ``output`` (dropout), ``h`` (dropouth), ``x``
    (dropoutx), ``input`` (dropouti), ``embedding`` (dropoute), ``weight`` (weight drop on
    the recurrent matrices)."""

    output: float = 0.0
    h: float = 0.0
    x: float = 0.0
    input: float = 0.0
    embedding: float = 0.0
    weight: float = 0.0

    def __post_init__(self) -> None:
        for k, v in vars(self).items():
            if not 0.0 <= v < 1.0:
                raise ValueError(f"dropout {k!r} must be in [0, 1), got {v}")


class Masks:
    """Dropout masks for one forward pass (scaled by 1/keep); ``None`` when inactive.

    ``columns`` = (rank, world size) when the batch is a rank's block of the global
    batch's columns: a mask with a batch dimension is drawn in the global batch's shape and
    sliced to this block, so every draw consumes the generator as one process does and
    ranks seeded alike get the one-process masks (their slices of them) exactly."""

    def __init__(self, active: bool, seed: int | None = None,
                 device: torch.device | None = None, columns: tuple[int, int] = (0, 1)) -> None:
        self.active = active
        self.rank, self.world_size = columns
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"columns must be (rank, world size) with 0 <= rank < world "
                             f"size, got {columns}")
        self.gen = None
        if active and seed is not None:
            self.gen = torch.Generator(device=device or torch.device("cpu")).manual_seed(seed)

    def __call__(self, shape: Sequence[int], p: float, like: torch.Tensor,
                 batch_dim: int | None = None) -> torch.Tensor | None:
        """A mask of ``shape`` (``shape[batch_dim]`` = this batch's columns, if any)."""
        if not self.active or p <= 0:
            return None
        keep = 1.0 - p
        full = list(shape)
        if batch_dim is not None:
            full[batch_dim] *= self.world_size
        m = torch.empty(full, dtype=like.dtype, device=like.device)
        m = m.bernoulli_(keep, generator=self.gen)
        if batch_dim is not None:  # this rank's block (all of it in one process)
            B = shape[batch_dim]
            m = m.narrow(batch_dim, self.rank * B, B)
        return m / keep


def _mul(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


class RecurrentCell(nn.Module):
    """What search and fixed cells share: the input node(s), node matrices, dropout masks
    and the loop over time. Subclasses define :meth:`nodes` (one time step)."""

    def __init__(self, ninp: int, nhid: int, num_nodes: int, dropouts: Dropouts,
                 backbone: str = "single") -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; use one of {BACKBONES}")
        if num_nodes < 1:
            raise ValueError(f"a recurrent cell needs at least one node, got {num_nodes}")
        self.ninp, self.nhid, self.num_nodes = ninp, nhid, num_nodes
        self.backbone, self.dropouts = backbone, dropouts
        self.num_inputs = 1 if backbone == "single" else 2

        def init(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape).uniform_(-INIT_RANGE, INIT_RANGE))

        if backbone == "single":
            self.W0 = init(ninp + nhid, 2 * nhid)
        elif ninp != nhid:  # two inputs: x_t is a node, so it must live in the state space
            self.Wx = init(ninp, nhid)
        self.Ws = nn.ParameterList(init(nhid, 2 * nhid) for _ in range(num_nodes))

    # --- one forward over a window --------------------------------------------------------
    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor, masks: Masks | None = None,
                arch: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``inputs`` (T, B, ninp), ``hidden`` (B, nhid) -> outputs (T, B, nhid), last state."""
        masks = masks or Masks(False)
        B = inputs.shape[1]
        d = self.dropouts
        x_mask = masks((B, self.ninp), d.x, inputs, batch_dim=0)
        h_mask = masks((B, self.nhid), d.h, hidden, batch_dim=0)
        W0 = getattr(self, "W0", None)
        if W0 is not None and d.weight > 0 and masks.active:
            wm = masks((self.nhid, 2 * self.nhid), d.weight, W0)
            W0 = torch.cat([W0[: self.ninp], W0[self.ninp :] * wm])
        Ws = [_mul(W, masks(W.shape, d.weight, W)) for W in self.Ws]
        outputs = []
        h = hidden
        for t in range(inputs.shape[0]):
            h = self.step(inputs[t], h, x_mask, h_mask, W0, Ws, arch)
            outputs.append(h)
        return torch.stack(outputs), h

    def input_states(self, x: torch.Tensor, h_prev: torch.Tensor, x_mask, h_mask,
                     W0: torch.Tensor | None) -> tuple[list[torch.Tensor], list]:
        """Input node states and the mask each one gets before its node matrices."""
        if self.backbone == "single":
            xh = torch.cat([_mul(x, x_mask), _mul(h_prev, h_mask)], dim=-1)
            c0, h0 = (xh @ W0).chunk(2, dim=-1)
            s0 = h_prev + torch.sigmoid(c0) * (torch.tanh(h0) - h_prev)
            return [s0], [h_mask]
        if hasattr(self, "Wx"):  # x_t projected into the state space, dropout before
            return [_mul(x, x_mask) @ self.Wx, h_prev], [None, h_mask]
        return [x, h_prev], [x_mask, h_mask]

    def step(self, x, h_prev, x_mask, h_mask, W0, Ws, arch) -> torch.Tensor:
        raise NotImplementedError


class FixedCell(RecurrentCell):
    """A cell from a genotype: node ``dst`` applies ``op`` to node ``src``'s state."""

    def __init__(self, genotype: Genotype, ninp: int, nhid: int, dropouts: Dropouts,
                 backbone: str = "single") -> None:
        cell = genotype.cell("recurrent")
        nodes = cell.nodes
        super().__init__(ninp, nhid, len(nodes), dropouts, backbone)
        first = self.num_inputs
        if list(nodes) != list(range(first, first + len(nodes))):
            last = first + len(nodes) - 1
            raise ValueError(f"genotype nodes {list(nodes)} must be {first}..{last}")
        self.edges = [cell.inputs_of(n)[0] for n in nodes]
        self.concat = tuple(cell.concat)
        self.ops = nn.ModuleList(create_rnn_op(e.op) for e in self.edges)
        if any(e.op == "none" for e in self.edges):
            raise ValueError("a fixed recurrent cell cannot use the 'none' op")

    def step(self, x, h_prev, x_mask, h_mask, W0, Ws, arch) -> torch.Tensor:
        states, smasks = self.input_states(x, h_prev, x_mask, h_mask, W0)
        for i, (e, op) in enumerate(zip(self.edges, self.ops, strict=True)):
            s = states[e.src]
            c, h = (_mul(s, smasks[e.src]) @ Ws[i]).chunk(2, dim=-1)
            states.append(s + torch.sigmoid(c) * (op(h, s) - s))
            smasks.append(h_mask)
        return torch.stack([states[i] for i in self.concat]).mean(0)


class SearchCell(RecurrentCell):
    """The mixed cell: every earlier node feeds every node through every candidate op.

    ``arch`` is ``(weights (E, K), active (E,) or None)`` with edges ordered by target
    node, then source (the space's alpha rows)."""

    def __init__(self, ninp: int, nhid: int, num_nodes: int, candidates: Sequence[str],
                 dropouts: Dropouts, backbone: str = "single", init_nodes: int | None = None,
                 ) -> None:
        super().__init__(ninp, nhid, num_nodes, dropouts, backbone)
        self.candidates = tuple(candidates)
        if all(c == "none" for c in self.candidates):
            raise ValueError("the recurrent space needs at least one op besides 'none'")
        self.ops = nn.ModuleList(create_rnn_op(c) for c in self.candidates)
        self._live = [k for k, c in enumerate(self.candidates) if c != "none"]
        n0 = num_nodes if init_nodes is None else init_nodes
        if not 1 <= n0 <= num_nodes:
            raise ValueError(f"init_nodes must be in 1..{num_nodes}, got {init_nodes}")
        self.register_buffer("active_nodes", torch.tensor(n0))
        self.register_buffer("maturity", (torch.arange(num_nodes) < n0).float())

    def num_edges(self) -> int:
        k = self.num_inputs
        return sum(k + i for i in range(self.num_nodes))

    def grow(self) -> int:
        """Activate the next node with output weight 0 (the function is unchanged)."""
        n = int(self.active_nodes)
        if n >= self.num_nodes:
            raise ValueError(f"the cell already has all {self.num_nodes} nodes")
        with torch.no_grad():
            self.maturity[n] = 0.0
            self.active_nodes.fill_(n + 1)
        return n + 1

    def fade_in(self, amount: float) -> None:
        """Raise the output weight of every active node by ``amount`` (capped at 1)."""
        with torch.no_grad():
            n = int(self.active_nodes)
            self.maturity[:n] = (self.maturity[:n] + amount).clamp(max=1.0)

    #: Training-time node normalisation over more than the batch at hand, e.g.
    #: ``distributed.global_batch_norm`` (the LM engine sets it under torchrun with
    #: ``distributed.sync_bn``); None: the batch at hand. Evaluation always uses the batch at
    #: hand (it runs on one rank).
    global_norm: Callable[..., torch.Tensor] | None = None

    def _bn(self, s: torch.Tensor) -> torch.Tensor:
        # Affine-free batch normalisation by batch statistics (no running state), as the
        # search cell of DARTS normalises every node.
        if self.training and self.global_norm is not None:
            return self.global_norm(s, eps=1e-5)
        return F.batch_norm(s, None, None, training=True, eps=1e-5)

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor, masks: Masks | None = None,
                arch: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`RecurrentCell.forward`; refuses batches of one sequence, which batch
        statistics cannot normalise (in eval mode too: the cell keeps no running ones)."""
        B = inputs.shape[1]
        if B < 2:
            got = (f"batch size {B}" if self.training
                   else f"eval batch size {B} (lm.eval_batch_size must be >= 2)")
            raise ValueError(
                "the recurrent search cell normalises every node by batch statistics, in "
                f"eval mode too, so it needs at least 2 sequences per batch; got {got}"
            )
        return super().forward(inputs, hidden, masks, arch)

    def step(self, x, h_prev, x_mask, h_mask, W0, Ws, arch) -> torch.Tensor:
        if arch is None:
            raise ValueError("the recurrent supernet needs arch weights: forward(x, arch_weights)")
        weights, active = arch
        states, smasks = self.input_states(x, h_prev, x_mask, h_mask, W0)
        if self.backbone == "single":
            states[0] = self._bn(states[0])
        offset = 0
        n_active = int(self.active_nodes)
        for i in range(n_active):
            S = torch.stack(states)  # (P, B, nhid), P = predecessors
            Sm = torch.stack([_mul(s, m) for s, m in zip(states, smasks, strict=True)])
            c, h = (Sm @ Ws[i]).chunk(2, dim=-1)
            c = torch.sigmoid(c)
            rows = weights[offset : offset + len(states)]  # (P, K)
            if active is None:
                # sum_k p_k (S + c (f_k - S)) = P S + c (sum_k p_k f_k - P S), P = sum_k p_k:
                # the same mixture with one gate product per predecessor instead of per op.
                p = rows[:, self._live].t()[:, :, None, None]  # (K, P, 1, 1)
                f = torch.stack([self.ops[k](h, S) for k in self._live])  # (K, P, B, H)
                PS = p.sum(0) * S
                s = (PS + c * ((p * f).sum(0) - PS)).sum(0)
            else:
                s = torch.zeros_like(states[0])
                for j in range(len(states)):
                    k = int(active[offset + j])
                    if self.candidates[k] != "none":
                        v = self.ops[k](h[j], S[j])
                        s = s + rows[j, k] * (S[j] + c[j] * (v - S[j]))
                    s = s + unsampled_weights(rows[j], k)  # as on the other spaces
            states.append(self._bn(s))
            smasks.append(h_mask)
            offset += len(states) - 1
        nodes = torch.stack(states[self.num_inputs :])
        m = self.maturity[:n_active].to(nodes.dtype)
        return (nodes * m[:, None, None]).sum(0) / m.sum()


class RnnLanguageModel(nn.Module):
    """Embedding -> recurrent cell -> tied decoder. ``forward(LmInput, arch_weights)``."""

    def __init__(self, cell: RecurrentCell, ntoken: int, dropouts: Dropouts,
                 tie_weights: bool = True) -> None:
        super().__init__()
        self.cell, self.ntoken, self.dropouts = cell, ntoken, dropouts
        self.encoder = nn.Embedding(ntoken, cell.ninp)
        self.decoder = nn.Linear(cell.nhid, ntoken)
        nn.init.uniform_(self.encoder.weight, -EMB_INIT_RANGE, EMB_INIT_RANGE)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            if cell.ninp != cell.nhid:
                raise ValueError(f"tied weights need ninp == nhid, got {cell.ninp} != {cell.nhid}")
            self.decoder.weight = self.encoder.weight

    @property
    def nhid(self) -> int:
        return self.cell.nhid

    def init_hidden(self, batch_size: int) -> torch.Tensor:
        w = self.encoder.weight
        return torch.zeros(batch_size, self.nhid, dtype=w.dtype, device=w.device)

    def _arch(self, arch_weights) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        return None

    def forward(self, inp: LmInput, arch_weights=None) -> LmOutput:
        tokens, hidden, seed, columns = inp
        B = tokens.shape[1]
        d = self.dropouts
        masks = Masks(self.training, seed, tokens.device, columns)
        W = self.encoder.weight  # embedding dropout: one mask over the vocabulary, all ranks
        emb = F.embedding(tokens, _mul(W, masks((W.shape[0], 1), d.embedding, W)))
        emb = _mul(emb, masks((1, B, emb.shape[-1]), d.input, emb, batch_dim=1))
        raw, last = self.cell(emb, hidden, masks, self._arch(arch_weights))
        out = _mul(raw, masks((1, B, raw.shape[-1]), d.output, raw, batch_dim=1))
        return LmOutput(self.decoder(out), last, raw, out)


class RnnSuperNet(RnnLanguageModel):
    """The search model: :class:`SearchCell` inside the language model."""

    cell: SearchCell

    def _arch(self, arch_weights):
        if arch_weights is None:
            raise ValueError("the recurrent supernet needs arch weights: forward(x, arch_weights)")
        active = None if arch_weights.active is None else arch_weights.active.get("recurrent")
        return arch_weights["recurrent"], active

    def grow(self) -> int:
        return self.cell.grow()


class RnnNetwork(RnnLanguageModel):
    """A fixed language model from a genotype (``forward(LmInput)``)."""

    def forward(self, inp: LmInput, arch_weights=None) -> LmOutput:
        if arch_weights is not None:
            raise ValueError("a fixed network takes no arch weights")
        return super().forward(inp)
