"""NAO's attention decoder (Luo et al., 2018; the released code's encoder/decoder): the
weights it attends with, what it can see, that a trained model reconstructs its cells
and that the search step raises the predicted accuracy. No benchmark table needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffnas.nasbench import QueryOracle
from diffnas.nasbench.encoding import NUM_EDGES, NUM_OPS, all_cells_array
from diffnas.nasbench.strategies import create_query_strategy
from diffnas.nasbench.strategies.nao import Nao, NaoSearch


def _model(seed: int = 0) -> Nao:
    torch.manual_seed(seed)
    return Nao(embed=8, hidden=12)


def _toy_accuracy(cell) -> float:
    """A smooth stand-in for validation accuracy: convs help, none hurts."""
    weights = np.array([-2.0, 0.5, 1.0, 1.5, 0.2])
    return 80.0 + float(weights[list(cell)].sum()) + 0.1 * cell[0]


def test_attention_weights_are_a_distribution_over_encoder_positions():
    model = _model()
    cells = torch.randint(0, NUM_OPS, (4, NUM_EDGES))
    with torch.no_grad():
        emb = model.encode(cells)
        logits, weights = model.decode(emb, cells, attention=True)
        greedy_logits, greedy_weights = model.decode(emb, attention=True)
    assert logits.shape == (4, NUM_EDGES, NUM_OPS)
    assert torch.equal(logits, model.decode(emb, cells))  # the flag only adds the weights
    for w in (weights, greedy_weights):
        assert w.shape == (4, NUM_EDGES, NUM_EDGES)  # step x encoder position
        assert (w >= 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(4, NUM_EDGES), atol=1e-6)


def test_first_step_sees_a_non_final_encoder_output_through_attention():
    """Move two encoder outputs apart, keeping their mean (the decoder's initial state):
    step 0 reads only the start token and that state, so any change comes from the
    attention over the per-token outputs. A decoder without attention (an LSTM over the
    outputs, or one started from the pooled/final state) cannot see it at step 0."""
    model = _model(1)
    cells = torch.randint(0, NUM_OPS, (3, NUM_EDGES))
    with torch.no_grad():
        emb = model.encode(cells)
        moved = emb.clone()
        moved[:, 1] += 0.5
        moved[:, 3] -= 0.5
        assert torch.allclose(moved.mean(1), emb.mean(1), atol=1e-6)
        base, w0 = model.decode(emb, cells, attention=True)
        changed, w1 = model.decode(moved, cells, attention=True)
    assert not torch.allclose(w1[:, 0], w0[:, 0])
    assert not torch.allclose(changed[:, 0], base[:, 0])


def test_architecture_embedding_is_the_normalized_mean():
    """As in the released code: unit-norm per-token outputs, their mean normalized again
    is what the predictor reads and what the decoder's states start from."""
    model = _model(2)
    cells = torch.randint(0, NUM_OPS, (5, NUM_EDGES))
    with torch.no_grad():
        emb = model.encode(cells)
        assert torch.allclose(emb.norm(dim=-1), torch.ones(5, NUM_EDGES), atol=1e-5)
        arch = Nao.pool(emb)
        assert torch.allclose(arch.norm(dim=-1), torch.ones(5), atol=1e-5)
        assert torch.allclose(model.predict(emb), model.predict(3 * emb), atol=1e-5)


@pytest.fixture(scope="module")
def trained():
    """A NAO model fitted with the strategy's own loss on 40 cells of a toy oracle."""
    rng = np.random.default_rng(0)
    cells = all_cells_array()[rng.choice(15_625, size=40, replace=False)].astype(np.int64)
    accs = np.array([_toy_accuracy(c) for c in cells])
    search = create_query_strategy("nao", {"embed": 16, "hidden": 32})
    assert isinstance(search, NaoSearch)
    torch.manual_seed(0)
    model = search.build_model()
    loss_of = search.round_loss(cells, accs, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=search.config.lr)
    for _ in range(400):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
    model.eval()
    return model, cells, accs


def test_trained_model_reconstructs_its_cells_from_the_unmoved_embeddings(trained):
    model, cells, _ = trained
    x = torch.from_numpy(cells)
    with torch.no_grad():
        decoded = model.decode(model.encode(x)).argmax(-1)  # greedy, no teacher forcing
    assert (decoded == x).all(1).float().mean() >= 0.9
    assert (decoded == x).float().mean() >= 0.95


@pytest.mark.parametrize("renormalize", [False, True])
def test_the_search_step_raises_the_predicted_accuracy(trained, renormalize):
    model, cells, accs = trained
    emb = model.encode(torch.from_numpy(cells)).detach().requires_grad_(True)
    pred = model.predict(emb)
    grad = torch.autograd.grad(pred.sum(), emb)[0]
    with torch.no_grad():
        for eta in (0.01, 0.05):
            gain = model.predict(Nao.move(emb, grad, eta, renormalize)) - pred
            assert (gain > 0).all(), (eta, gain.min())
    # and the fitted predictor does rank the cells
    assert np.corrcoef(pred.detach().numpy(), accs)[0, 1] > 0.8


@pytest.mark.parametrize("renormalize", [False, True])
def test_search_proposes_decoded_cells(renormalize):
    oracle = QueryOracle(_toy_accuracy, budget=30)
    search = create_query_strategy(
        "nao", {"initial": 10, "batch": 5, "epochs": 10, "seeds": 5,
                "renormalize": renormalize})
    search.search(oracle, np.random.default_rng(0))
    assert oracle.used == 30
    assert len({c for c, _ in oracle.history}) == 30
