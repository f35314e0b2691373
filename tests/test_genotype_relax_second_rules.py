"""Second audit of genotypes, discretizers, relaxations and architecture parameters: rules
a mutation of the code could break unnoticed by the earlier tests. Cell titles; genotype
files that are binary, or text with stray whitespace; DARTS text whose ``range`` is not of
ints, a key repeated in the generic text form and keywords in a ``range`` (all refused);
logits whose shape does not match the space's edges (refused, not silently cut); the
DARTS rule computed in float64 and following the space's concat and node order; a plugin
rule's non-genotype; the check of a plugin relaxation's output (shapes, op indices, every
group); hard Gumbel weights in the logits' dtype; and the architecture parameters as DARTS
initialises them (``1e-3 * randn``) with PC-DARTS's edge betas (zeros, no RNG draw,
idempotent, sampled ops kept). Expected values are worked out by hand from the documented
rules."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_space

from diffnas.arch import ArchParams
from diffnas.arch.relax import (
    RELAXATIONS,
    ArchWeights,
    Relaxation,
    check_relaxation_output,
    create_relaxation,
)
from diffnas.genotype import Genotype, GenotypeError, cell_title, from_darts_str, published_genotype
from diffnas.genotype.discretize import DISCRETIZERS, discretize, takes_edge_weights
from diffnas.spaces.base import EdgeSpec


# --- genotypes ------------------------------------------------------------------------------
def test_a_name_that_already_says_cell_is_not_titled_twice():
    assert cell_title("normal cell") == "normal cell"
    assert cell_title("recurrent cell") == "recurrent cell"
    assert cell_title("reduce") == "reduce cell"


def test_a_binary_file_is_named_as_not_a_genotype_file(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(b"\x80\x02\xff\xfe\x00\x81binary")
    with pytest.raises(GenotypeError, match=rf"^{p}: not a genotype file \(binary, not text\)"):
        Genotype.load(p)


@pytest.mark.parametrize("concat", ["range('2')", "range(2.0, 6.0)"])
def test_a_range_of_non_integers_is_malformed_text_not_a_type_error(concat):
    text = str(published_genotype("DARTS_V2")).replace("normal_concat=[2, 3, 4, 5]",
                                                       f"normal_concat={concat}")
    with pytest.raises(GenotypeError, match="malformed DARTS genotype text"):
        from_darts_str(text)


def test_darts_text_with_surrounding_whitespace_reads_as_the_genotype():
    g = published_genotype("DARTS_V1")
    assert from_darts_str(f"  \n {g}\n\n") == g


_GENERIC_TWICE = [
    # the generic form's cells object names 'cell' twice: the first cell would be dropped
    "Genotype(space='nb201', cells={'cell': {'edges': [['none', 0, 1]], 'concat': [1]}, "
    "'cell': {'edges': [['skip_connect', 0, 1]], 'concat': [1]}})",
    # one cell gives 'edges' twice
    "Genotype(space='nb201', cells={'cell': {'edges': [['none', 0, 1]], 'concat': [1], "
    "'edges': [['skip_connect', 0, 1]]}})",
]


@pytest.mark.parametrize("text", _GENERIC_TWICE)
def test_a_key_given_twice_in_generic_genotype_text_is_refused(text):
    """Parsing is strict: a repeated key is refused as in the JSON reader, not resolved by
    literal_eval keeping the last one (which would silently drop a cell or its edges)."""
    with pytest.raises(GenotypeError, match="given twice"):
        from_darts_str(text)


def test_a_concat_range_with_keywords_is_refused():
    """range() takes no keywords in Python; the reader must not drop them and read a
    different concat."""
    text = str(published_genotype("DARTS_V2")).replace("normal_concat=[2, 3, 4, 5]",
                                                       "normal_concat=range(2, 6, step=2)")
    with pytest.raises(GenotypeError, match="malformed DARTS genotype text"):
        from_darts_str(text)


# --- discretizers ---------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["darts", "argmax"])
@pytest.mark.parametrize("change", ["one_row_short", "one_row_more", "one_op_short", "no_reduce"])
def test_logits_that_do_not_fit_the_space_are_refused_naming_the_group(rule, change):
    """Rows are matched to edges in order: logits with a missing or extra row, or a missing
    op column, would silently drop an edge or an op. They are refused, naming the group."""
    space = tiny_space()
    logits = {g: torch.zeros(len(edges), len(edges[0].candidates), dtype=torch.float64)
              for g, edges in space.edge_groups().items()}
    discretize(logits, space, rule=rule)  # the right shapes are read
    a = logits["reduce"]
    if change == "one_row_short":
        logits["reduce"] = a[:-1]
    elif change == "one_row_more":
        logits["reduce"] = torch.cat([a, a[:1]])
    elif change == "one_op_short":
        logits["reduce"] = a[:, :-1]
    else:
        del logits["reduce"]
    with pytest.raises(ValueError, match="'reduce'"):
        discretize(logits, space, rule=rule)


def _zero_logits() -> dict[str, torch.Tensor]:
    return {g: torch.zeros(5, 8, dtype=torch.float64) for g in ("normal", "reduce")}


def test_float32_alphas_one_ulp_apart_are_not_a_tie():
    """Edge 2->3's alpha is the float32 just above edge 0->3's: the larger alpha has the
    larger softmax weight (softmax is monotone), so 2->3 is kept; only a tie would fall
    to the lower source. (In float32 arithmetic both weights round to one value.)"""
    one = torch.tensor(1.0)
    above = torch.nextafter(one, torch.tensor(2.0))
    assert above > one
    normal = torch.zeros(5, 8)  # rows: 0->2, 1->2, 0->3, 1->3, 2->3; column 4: sep_conv_3x3
    normal[2, 4], normal[3, 4], normal[4, 4] = one, 3.0, above
    g = discretize({"normal": normal, "reduce": torch.zeros(5, 8)}, tiny_space())
    assert [e.src for e in g.cell("normal").inputs_of(3)] == [1, 2]


def _plugin_space(**methods):
    """tiny_space's class with some methods replaced, as a plugin space would."""
    space = tiny_space()
    return type("AuditSpace", (type(space),), methods)(space.config, space.shape)


def test_the_darts_rule_takes_the_cell_output_from_the_space_s_concat():
    """A space whose cell output is its last node only (as nb201's is)."""
    space = _plugin_space(concat=lambda self, group: (3,))
    g = discretize(_zero_logits(), space)
    assert g.cell("normal").concat == (3,) and g.cell("reduce").concat == (3,)


def test_the_darts_rule_lists_nodes_in_order_whatever_the_space_s_edge_order():
    """A plugin space listing node 3's edges before node 2's: the genotype still lists
    node 2's inputs first (as DARTS's genotype() does), so its text is the DARTS form."""
    def edges(self):
        es = type(tiny_space()).edges(self)
        return [e for cell in ("normal", "reduce")
                for e in [x for x in es if x.cell == cell][::-1]]

    space = _plugin_space(edges=edges)
    assert [e.dst for e in space.edge_groups()["normal"]][0] == 3
    g = discretize(_zero_logits(), space)
    assert [e.dst for e in g.cell("normal").edges] == [2, 2, 3, 3]
    assert str(g).startswith("Genotype(normal=[")


def test_a_plugin_rule_returning_a_dict_is_refused(monkeypatch):
    def rule(logits, space):
        return DISCRETIZERS.get("darts")(logits, space).to_dict()

    monkeypatch.setitem(DISCRETIZERS._items, "audit_dict_rule", rule)
    with pytest.raises(ValueError, match=r"discretizer 'audit_dict_rule' returned dict, not a "
                                         r"Genotype"):
        discretize(_zero_logits(), tiny_space(), rule="audit_dict_rule")


def test_a_callable_without_a_signature_is_called_the_plain_way():
    assert takes_edge_weights(max) is False


# --- checking a plugin relaxation's output ------------------------------------------------
class _Plugin(Relaxation):
    """A plugin relaxation returning what ``make(logits)`` gives."""

    make = None

    def __call__(self, logits):
        return type(self).make(logits)


def _check(monkeypatch, make, logits):
    cls = type("_AuditPlugin", (_Plugin,), {"make": staticmethod(make),
                                            "__module__": __name__})
    monkeypatch.setitem(RELAXATIONS._items, "audit_plugin", cls)
    check_relaxation_output({"name": "audit_plugin"}, logits)


def _soft(logits):
    return {g: torch.softmax(a, -1) for g, a in logits.items()}


LOGITS = {"normal": torch.zeros(3, 4), "reduce": torch.zeros(2, 4)}


def test_a_plugin_relaxation_with_sound_output_passes(monkeypatch):
    _check(monkeypatch, lambda lg: ArchWeights(_soft(lg)), LOGITS)
    _check(monkeypatch, lambda lg: ArchWeights(_soft(lg), {g: torch.full((a.shape[0],), 3)
                                                           for g, a in lg.items()}), LOGITS)
    assert RELAXATIONS.get("audit_plugin").__name__ == "_AuditPlugin"


def test_every_group_s_weight_shape_is_checked(monkeypatch):
    """The second group is checked too, also when the relaxation samples no ops."""
    def make(lg):
        w = _soft(lg)
        w["reduce"] = torch.ones(2, 5) / 5  # one op too many
        return ArchWeights(w)

    with pytest.raises(ValueError, match=r"gave group 'reduce' weights \(2, 5\), expected the "
                                         r"logits' shape \(2, 4\)"):
        _check(monkeypatch, make, LOGITS)


@pytest.mark.parametrize("active", [
    torch.tensor([0, 4, 1]),  # 4 ops: index 4 is one past the last
    torch.tensor([0, -1, 1]),
    torch.zeros(3, 1, dtype=torch.long),  # one index per edge, not a column
])
def test_a_plugin_relaxation_s_active_must_be_one_op_index_in_range_per_edge(monkeypatch, active):
    def make(lg):
        return ArchWeights(_soft(lg), {"normal": active, "reduce": torch.zeros(2, dtype=int)})

    with pytest.raises(ValueError, match=r"(?s)gave group 'normal' active .*expected one op index "
                                         r"in \[0, 4\) per edge, shape \(3,\)"):
        _check(monkeypatch, make, LOGITS)


# --- relaxations ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_hard_gumbel_weights_keep_the_logits_dtype(dtype):
    a = torch.randn(3, 4, generator=torch.Generator().manual_seed(2)).to(dtype)
    torch.manual_seed(0)
    aw = create_relaxation("hard_gumbel", tau=1.0, tau_min=None)({"g": a})
    assert aw["g"].dtype == dtype
    assert torch.equal(aw["g"].float(), torch.nn.functional.one_hot(aw.active["g"], 4).float())


# --- architecture parameters -----------------------------------------------------------
def test_alphas_start_as_darts_1e_3_times_randn_from_the_given_generator():
    """DARTS: ``1e-3 * torch.randn(num_edges, num_ops)`` per cell type, normal first."""
    torch.manual_seed(123)  # the global RNG must not be what is used
    arch = ArchParams(tiny_space(), generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    for group in ("normal", "reduce"):
        want = 1e-3 * torch.randn(5, 8, generator=g)
        assert torch.equal(arch[group].detach(), want)


class _MixedSpace:
    """A space whose edges of one group offer different candidate lists."""

    def edge_groups(self):
        return {"cell": [EdgeSpec("cell/n1/e0", "cell", 0, 1, ("skip_connect", "none")),
                         EdgeSpec("cell/n2/e1", "cell", 1, 2, ("skip_connect",))]}


def test_a_group_whose_edges_differ_in_candidates_is_refused():
    with pytest.raises(ValueError, match=r"edges of group 'cell' must share one candidate list"):
        ArchParams(_MixedSpace())


def test_edge_betas_start_at_zero_draw_nothing_and_weigh_a_node_s_inputs_equally():
    """Node 2 has 2 inputs, node 3 has 3: softmax(0) gives 1/2 and 1/3."""
    arch = ArchParams(tiny_space(), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(9)
    want_rng = torch.rand(3)
    torch.manual_seed(9)
    arch.add_edge_betas()
    assert torch.equal(torch.rand(3), want_rng)
    for group in ("normal", "reduce"):
        assert torch.equal(arch.betas[group].detach(), torch.zeros(5))
        torch.testing.assert_close(arch.edge_weights()[group],
                                   torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3]))


def test_adding_edge_betas_again_keeps_the_trained_ones():
    arch = ArchParams(tiny_space())
    arch.add_edge_betas()
    beta = arch.betas["normal"]
    with torch.no_grad():
        beta.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    arch.add_edge_betas()
    assert arch.betas["normal"] is beta
    assert torch.equal(arch.betas["normal"].detach(), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))


def test_normalizing_sampled_weights_scales_them_and_keeps_the_sampled_ops():
    """GDAS with edge normalization: each edge's one-hot row times its edge weight, and the
    supernet still computes only the sampled op (``active`` kept)."""
    arch = ArchParams(tiny_space(), generator=torch.Generator().manual_seed(0))
    arch.add_edge_betas()  # zeros: node 2's inputs weigh 1/2, node 3's 1/3
    torch.manual_seed(1)
    aw = create_relaxation("hard_gumbel", tau=1.0, tau_min=None)(arch.as_dict())
    out = arch.normalize(aw)
    assert out.active is not None and set(out.active) == {"normal", "reduce"}
    assert all(torch.equal(out.active[g], aw.active[g]) for g in aw.active)
    scale = torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3])
    for group in ("normal", "reduce"):
        torch.testing.assert_close(out[group].detach(),
                                   aw[group].detach() * scale[:, None])
