import json

import pytest

from vidsparse import FRAMES, Budget, Recipe, SpecError
from vidsparse.errors import InputError
from vidsparse.registry import parse_spec, spec_of


def test_parse_spec_values():
    assert parse_spec("bolt") == ("bolt", {})
    assert parse_spec("bolt:power=2.5,seed=3,adaptive=true,name=x") == (
        "bolt", {"power": 2.5, "seed": 3, "adaptive": True, "name": "x"})


@pytest.mark.parametrize("spec", ["", ":x=1", "bolt:power", "bolt:=3", "bolt:power=1,power=2", "bo lt", "bolt:1x=2"])
def test_parse_spec_malformed(spec):
    with pytest.raises(SpecError):
        parse_spec(spec)


def test_unknown_method_suggests():
    with pytest.raises(SpecError, match="Did you mean 'bolt'"):
        FRAMES.from_spec("blot")


def test_unknown_and_mistyped_parameters():
    with pytest.raises(SpecError, match="no parameter 'pwr'"):
        FRAMES.from_spec("bolt:pwr=3")
    with pytest.raises(SpecError, match="expected a number"):
        FRAMES.from_spec("bolt:power=high")
    with pytest.raises(SpecError, match="expected an integer"):
        FRAMES.from_spec("tstar:rows=2.5")
    with pytest.raises(SpecError, match="bad parameters"):
        FRAMES.from_spec("tstar:search=3")


def test_int_is_accepted_for_float_and_spec_roundtrip():
    m = FRAMES.from_spec("bolt:power=2")
    assert m.power == 2.0 and isinstance(m.power, float)
    assert spec_of(m) == "bolt:power=2.0"
    assert spec_of(FRAMES.from_spec("bolt")) == "bolt"
    assert spec_of(FRAMES.from_spec(spec_of(FRAMES.from_spec("scenes:adaptive=true")))).endswith("adaptive=true")


def test_every_registered_selector_builds_with_defaults():
    for name in FRAMES.names():
        assert FRAMES.from_spec(name).name == name


def test_recipe_roundtrips():
    r = Recipe(frames="bolt:power=3", scorer="ocr", tokens="aot:keep=0.25", attention="block_cdf:tau=0.95",
               kv="vidkv:bits=1.5", budget=Budget(frames=64, tokens=8192, density=0.1, kv_bits=1.5))
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_json(r.to_json()) == r
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert Recipe.from_cli(r.to_cli()) == r
    assert json.loads(r.to_json())["budget"]["tokens"] == 8192


def test_recipe_load_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("frames: ktv\nbudget: {frames: 16}\n")
    assert Recipe.load(str(p)) == Recipe(frames="ktv", budget=Budget(frames=16))
    with pytest.raises(InputError, match="does not exist"):
        Recipe.load(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("bad", [
    {"frames": 3}, {"framez": "ktv"}, {"budget": {"frames": 0}}, {"budget": {"frame": 3}}, {"budget": 5},
    {"frames": "bolt:power"}, {"budget": {"frames": -1}}, {"budget": {"density": 1.5}},
])
def test_recipe_rejects(bad):
    with pytest.raises(InputError):
        Recipe.from_dict(bad)


def test_recipe_bad_text():
    with pytest.raises(SpecError):
        Recipe.from_json("{not json")
    with pytest.raises(SpecError):
        Recipe.from_yaml("frames: [")
    with pytest.raises(SpecError):
        Recipe.from_cli("--frames")


@pytest.mark.parametrize("frames", [0, -3, True, 2.5])
def test_budget_must_be_positive_int(frames):
    with pytest.raises(InputError):
        Budget(frames=frames)


def test_budget_token_total_default():
    assert Budget(frames=10).token_total == 2560
    assert Budget(frames=10, tokens=100).token_total == 100
