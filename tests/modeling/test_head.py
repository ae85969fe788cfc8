"""Heads: the registry, the matching head's interface, and rebuilding a head from its config
and weights."""

from __future__ import annotations

import pytest
import torch
from stand_ins import random_head, registered

from grounding.errors import ConfigError, DataError
from grounding.modeling.head import (
    HEADS,
    Head,
    HeadConfig,
    MatchingHead,
    MatchingSettings,
    PriorMatchingHead,
    build_head,
    head_config,
    head_from_weights,
)

CONFIG = HeadConfig(region_dim=5, phrase_dim=3, hidden=8, dropout=0.0)


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(7, 5, generator=generator), torch.randn(4, 3, generator=generator)


def scores(head: MatchingHead, regions: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
    """The logits of every phrase with every region ``(P * N,)``, phrase-major."""
    with torch.inference_mode():
        n, p = len(regions), len(phrases)
        return head.score(
            head.embed_regions(regions).repeat(p, 1),
            head.embed_phrases(phrases).repeat_interleave(n, 0),
        )


# --- the registry ----------------------------------------------------------------------------


def build(name: str, config: HeadConfig = CONFIG) -> Head:
    settings = {"hidden": config.hidden, "dropout": config.dropout}
    return build_head(
        name,
        region_dim=config.region_dim,
        phrase_dim=config.phrase_dim,
        sections={name: settings},
    )


def test_the_heads_are_registered() -> None:
    assert HEADS.plain_names() == ["matching", "matching_prior"]
    head = build("matching")
    assert isinstance(head, MatchingHead) and head.config == CONFIG
    assert type(build("matching_prior")) is PriorMatchingHead
    assert head_config(head)["name"] == "matching"


def test_an_unknown_head_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"train.head: unknown head 'transformer'.*matching"):
        build("transformer")


def test_a_head_takes_its_settings_defaults_and_refuses_bad_ones() -> None:
    head = build_head("matching", region_dim=5, phrase_dim=3)
    assert (head.config.hidden, head.config.dropout) == (256, 0.1)  # MatchingSettings()
    with pytest.raises(ConfigError, match=r"heads\.matching: expected hidden >= 1"):
        build_head("matching", region_dim=5, phrase_dim=3, sections={"matching": {"hidden": 0}})
    with pytest.raises(ConfigError, match=r"heads\.matching\.depth"):
        build_head("matching", region_dim=5, phrase_dim=3, sections={"matching": {"depth": 2}})


def test_a_registered_head_can_be_built_and_named() -> None:
    class OtherHead(MatchingHead):
        name = "other"

    def make(settings: MatchingSettings, *, region_dim: int, phrase_dim: int) -> Head:
        return OtherHead(HeadConfig(region_dim, phrase_dim, settings.hidden, settings.dropout))

    with registered(HEADS, "other", make, MatchingSettings):
        head = build("other")
        assert type(head) is OtherHead
        assert head_config(head)["name"] == "other"
        assert type(head_from_weights(head_config(head), head.state_dict())) is OtherHead


# --- the matching head -----------------------------------------------------------------------


def test_matching_head_embeds_both_sides_in_one_space_and_scores_aligned_pairs() -> None:
    head = build("matching").eval()
    regions, phrases = inputs()
    embedded_regions, embedded_phrases = head.embed_regions(regions), head.embed_phrases(phrases)
    assert embedded_regions.shape == (7, 8) and embedded_phrases.shape == (4, 8)
    logits = head.score(embedded_regions[:4], embedded_phrases)
    assert logits.shape == (4,)
    # each pair is scored on its own: the second pair's logit does not depend on the others
    alone = head.score(embedded_regions[1:2], embedded_phrases[1:2])
    torch.testing.assert_close(alone, logits[1:2])


def test_matching_head_scores_the_product_beside_the_projections() -> None:
    head = build("matching").eval()
    regions, phrases = torch.randn(3, 8), torch.randn(3, 8)
    expected = head.scorer(torch.cat([regions * phrases, regions, phrases], dim=1)).squeeze(1)
    torch.testing.assert_close(head.score(regions, phrases), expected)


# --- the matching head with a box prior --------------------------------------------------------

PRIOR_CONFIG = HeadConfig(region_dim=12, phrase_dim=3, hidden=8, dropout=0.0)  # 5 visual + 7 boxes


def test_the_prior_head_keeps_the_geometry_beside_the_projection() -> None:
    head = build("matching_prior", PRIOR_CONFIG).eval()
    regions = torch.randn(6, 12)
    embedded = head.embed_regions(regions)
    assert embedded.shape == (6, 8 + 7)
    torch.testing.assert_close(embedded[:, 8:], regions[:, 5:])
    phrases = head.embed_phrases(torch.randn(6, 3))
    assert head.score(embedded, phrases).shape == (6,)


def test_the_prior_adds_a_geometry_score_to_the_matching_score() -> None:
    torch.manual_seed(0)
    head = build("matching_prior", PRIOR_CONFIG).eval()
    regions, phrases = head.embed_regions(torch.randn(4, 12)), head.embed_phrases(torch.randn(4, 3))
    projected, geometry = regions[:, :8], regions[:, 8:]
    expected = MatchingHead.score(head, projected, phrases) + head.prior(
        torch.cat([phrases, geometry], dim=1)
    ).squeeze(1)
    torch.testing.assert_close(head.score(regions, phrases), expected)
    # the same visual features in another place score differently for the same phrase
    moved = torch.cat([projected, geometry.flip(0)], dim=1)
    assert not torch.allclose(head.score(moved, phrases), head.score(regions, phrases))


def test_the_prior_head_scores_a_grid_block_as_its_rows() -> None:
    # the ONNX export scores (phrases, regions, dim) blocks; training scores (pairs, dim) rows
    torch.manual_seed(0)
    head = build("matching_prior", PRIOR_CONFIG).eval()
    regions, phrases = head.embed_regions(torch.randn(5, 12)), head.embed_phrases(torch.randn(3, 3))
    with torch.inference_mode():
        grid = head.score(
            regions.unsqueeze(0).expand(3, -1, -1), phrases.unsqueeze(1).expand(-1, 5, -1)
        )
        rows = head.score(regions.repeat(3, 1), phrases.repeat_interleave(5, 0))
    torch.testing.assert_close(grid.reshape(-1), rows)


def test_the_prior_head_rebuilds_from_its_weights() -> None:
    torch.manual_seed(1)
    head = build("matching_prior", PRIOR_CONFIG).eval()
    again = head_from_weights(head_config(head), head.state_dict())
    assert type(again) is PriorMatchingHead and head_config(again)["name"] == "matching_prior"
    regions, phrases = torch.randn(7, 12), torch.randn(4, 3)
    torch.testing.assert_close(scores(again, regions, phrases), scores(head, regions, phrases))


# --- config and weights ----------------------------------------------------------------------


def test_head_config_names_the_head_and_its_shape() -> None:
    assert head_config(random_head(5, 3, hidden=8)) == {
        "name": "matching",
        "config": {"region_dim": 5, "phrase_dim": 3, "hidden": 8, "dropout": 0.0},
    }


def test_head_from_weights_gives_the_same_scores() -> None:
    head = random_head(5, 3, hidden=8, seed=1)
    again = head_from_weights(head_config(head), head.state_dict())
    assert type(again) is MatchingHead and not again.training
    regions, phrases = inputs()
    torch.testing.assert_close(scores(again, regions, phrases), scores(head, regions, phrases))
    # a head of another seed scores differently: the weights, not the shape, were restored
    other = random_head(5, 3, hidden=8, seed=2)
    assert not torch.allclose(scores(other, regions, phrases), scores(head, regions, phrases))


@pytest.mark.parametrize(
    "change",
    [
        lambda config, tensors: ({**config, "name": "transformer"}, tensors),
        lambda config, tensors: ({"config": config["config"]}, tensors),
        lambda config, tensors: ({**config, "config": {**config["config"], "hidden": 16}}, tensors),
        lambda config, tensors: (
            {**config, "config": {**config["config"], "depth": 2}},
            tensors,
        ),
        lambda config, tensors: (config, {k: v for k, v in tensors.items() if "scorer" not in k}),
        lambda config, tensors: (config, {**tensors, "extra.weight": torch.zeros(1)}),
    ],
    ids=["unknown name", "no name", "other shape", "unknown key", "missing tensors", "extra"],
)
def test_weights_that_do_not_describe_a_head_are_a_data_error(change) -> None:
    head = random_head(5, 3, hidden=8)
    config, tensors = change(head_config(head), head.state_dict())
    with pytest.raises(DataError, match="not a head of this project"):
        head_from_weights(config, tensors)
