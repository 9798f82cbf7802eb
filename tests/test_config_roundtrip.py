"""fengine.config's round trip through JSON for what tyro parses: a union of dataclasses (a
subcommand) comes back as the class it held, an Enum as its member; files that name another
class, an unknown member, a bool for an int literal or a list for a dict are refused; a config
the previous `to_dict` wrote (no unions, no Enums) loads unchanged."""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any, Literal

import pytest
from test_cli import classify

from fengine import cli
from fengine.config import config_hash, from_dict, to_dict


@dataclasses.dataclass(frozen=True)
class Adam:
    lr: float = 1e-3
    b1: float = 0.9


@dataclasses.dataclass(frozen=True)
class SGD:
    lr: float = 0.1


class Act(enum.Enum):
    RELU = "relu"
    GELU = "gelu"


class Mode(str, enum.Enum):
    FAST = "fast"
    SLOW = "slow"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Cfg:
    opt: Adam | SGD = Adam()
    maybe: Adam | SGD | None = None
    chain: tuple[Adam | SGD, ...] = ()
    act: Act = Act.RELU
    acts: tuple[Act, ...] = ()
    gate: Act | None = None
    mode: Mode = Mode.FAST
    level: Level = Level.LOW
    k: Literal[1, 2] = 1
    pick: Literal[Act.RELU, Act.GELU] = Act.RELU
    extra: dict[str, int] = dataclasses.field(default_factory=dict)
    by_id: dict[int, float] = dataclasses.field(default_factory=dict)
    by_act: dict[Act, int] = dataclasses.field(default_factory=dict)
    anything: dict = dataclasses.field(default_factory=dict)


def _through_json(cfg: Any) -> Any:
    """``cfg`` written and read back as the CLI does (``json.dumps`` then ``json.loads``)."""
    return from_dict(type(cfg), json.loads(json.dumps(to_dict(cfg))))


def _previous_to_dict(cfg: Any) -> dict[str, Any]:
    """What `to_dict` wrote before unions and Enums were handled."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize(
    "cfg",
    [
        Cfg(),
        Cfg(opt=SGD(lr=0.5)),
        Cfg(opt=Adam(lr=0.5, b1=0.8), maybe=SGD(0.2), chain=(SGD(0.3), Adam(0.4), SGD())),
        Cfg(act=Act.GELU, acts=(Act.GELU, Act.RELU), gate=Act.GELU),
        Cfg(mode=Mode.SLOW, level=Level.HIGH, k=2, pick=Act.GELU),
        Cfg(extra={"a": 1}, by_id={3: 0.5, -1: 2.0}, by_act={Act.GELU: 4}, anything={"x": [1]}),
    ],
)
def test_unions_enums_and_dicts_round_trip_to_an_equal_config(cfg):
    back = _through_json(cfg)
    assert back == cfg
    assert type(back.opt) is type(cfg.opt)
    assert [type(c) for c in back.chain] == [type(c) for c in cfg.chain]
    assert isinstance(back.act, Act) and isinstance(back.mode, Mode)


def test_the_union_class_is_recorded_by_name_and_enums_by_member_name():
    data = to_dict(Cfg(opt=SGD(lr=0.5), maybe=None, chain=(Adam(),), act=Act.GELU))
    assert data["opt"] == {"__type__": "SGD", "lr": 0.5}
    assert data["maybe"] is None
    assert data["chain"] == [{"__type__": "Adam", "lr": 1e-3, "b1": 0.9}]
    assert data["act"] == "GELU" and data["mode"] == "FAST" and data["level"] == "LOW"


def test_a_union_subcommand_round_trips_through_the_command_line_and_a_config_file(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Config(cli.RunConfig):
        max_steps: int | None = 10
        act: Act = Act.RELU
        opt: Adam | SGD = Adam()

    cfg, _ = cli.parse(Config, ["--act", "GELU", "opt:sgd", "--opt.lr", "0.5"])
    assert cfg.opt == SGD(lr=0.5) and cfg.act is Act.GELU
    path = tmp_path / "config.json"
    path.write_text(json.dumps(to_dict(cfg)))
    again, _ = cli.parse(Config, ["--config", str(path)])
    assert again.opt == SGD(lr=0.5) and type(again.opt) is SGD and again.act is Act.GELU


# -------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "data, error, match",
    [
        ({"opt": {"lr": 0.5}}, ValueError, r"Cfg\.opt: .*\"__type__\".*\['Adam', 'SGD'\]; got none"),
        ({"opt": {"__type__": "Path", "lr": 0.5}}, ValueError, r"Cfg\.opt: .*'Path'.*\['Adam', 'SGD'\]"),
        ({"opt": {"__type__": "os.system"}}, ValueError, r"Cfg\.opt: .*'os.system'.*\['Adam', 'SGD'\]"),
        ({"opt": {"__type__": 3}}, ValueError, r"Cfg\.opt: \"__type__\" is 3, expected one of"),
        ({"opt": {"__type__": "SGD", "b1": 0.5}}, ValueError, r"Cfg\.opt: SGD has no fields \['b1'\]"),
        ({"maybe": {"lr": 0.5}}, ValueError, r"Cfg\.maybe: .*\['Adam', 'SGD'\]"),
        ({"chain": [{"__type__": "Nope"}]}, ValueError, r"Cfg\.chain\[0\]: .*'Nope'"),
        ({"act": "SWISH"}, ValueError, r"Cfg\.act: 'SWISH' is not a member of Act; members are \['RELU', 'GELU'\]"),
        ({"act": "relu"}, ValueError, r"Cfg\.act: 'relu' is not a member of Act"),
        ({"act": 1}, TypeError, r"Cfg\.act: expected the name of a Act member, one of \['RELU', 'GELU'\]; got 1"),
        ({"acts": ["RELU", "X"]}, ValueError, r"Cfg\.acts\[1\]: 'X' is not a member of Act"),
        ({"level": True}, TypeError, r"Cfg\.level: .*got True"),
        ({"k": True}, ValueError, r"Cfg\.k: True is not one of \(1, 2\)"),
        ({"k": 1.0}, ValueError, r"Cfg\.k: 1\.0 is not one of \(1, 2\)"),
        ({"k": 3}, ValueError, r"Cfg\.k: 3 is not one of \(1, 2\)"),
        ({"pick": "TANH"}, ValueError, r"Cfg\.pick: 'TANH' is not one of"),
        ({"anything": [1, 2, 3]}, TypeError, r"Cfg\.anything: expected a dict .*\[1, 2, 3\]"),
        ({"extra": [1, 2, 3]}, TypeError, r"Cfg\.extra: expected a dict .*\[1, 2, 3\]"),
        ({"extra": {"a": "x"}}, TypeError, r"Cfg\.extra\['a'\]: expected int, got 'x'"),
        ({"extra": {"a": True}}, TypeError, r"Cfg\.extra\['a'\]: expected int, got True"),
        ({"by_id": {"one": 1.0}}, TypeError, r"Cfg\.by_id: key 'one': expected int, got 'one'"),
        ({"by_act": {"TANH": 1}}, ValueError, r"Cfg\.by_act: key 'TANH': 'TANH' is not a member"),
    ],
)  # fmt: skip
def test_from_dict_refuses_naming_the_field_and_what_is_allowed(data, error, match):
    with pytest.raises(error, match=r"from_dict: " + match):
        from_dict(Cfg, data)


def test_a_tag_on_a_field_that_is_not_a_union_is_an_unknown_field():
    @dataclasses.dataclass(frozen=True)
    class Plain:
        opt: Adam = Adam()

    assert "__type__" not in to_dict(Plain())["opt"]
    with pytest.raises(ValueError, match=r"Plain\.opt: Adam has no fields \['__type__'\]"):
        from_dict(Plain, {"opt": {"__type__": "Adam"}})


_OtherAdam = dataclasses.make_dataclass("Adam", [("lr", float, 0.1)], frozen=True)


@dataclasses.dataclass(frozen=True)
class Twins:
    opt: Adam | _OtherAdam = Adam()


def test_a_union_of_two_classes_of_one_name_is_refused():
    with pytest.raises(TypeError, match=r"Twins\.opt: the union Adam \| Adam has two dataclasses"):
        to_dict(Twins())
    with pytest.raises(TypeError, match=r"Twins\.opt: the union Adam \| Adam has two dataclasses"):
        from_dict(Twins, {"opt": {"__type__": "Adam"}})


# ------------------------------------------------------------ earlier configs
def test_a_config_the_previous_code_wrote_loads_unchanged_and_hashes_the_same():
    cfg = classify.Config()
    previous = _previous_to_dict(cfg)
    assert to_dict(cfg) == previous  # no unions, no Enums: the same JSON, the same hash
    assert config_hash(cfg) == config_hash(previous)
    assert from_dict(classify.Config, json.loads(json.dumps(previous))) == cfg


def test_enums_the_previous_code_wrote_still_load():
    """It wrote ``str(member)`` for a plain Enum and the value for a str or int Enum."""

    @dataclasses.dataclass(frozen=True)
    class Enums:
        act: Act = Act.RELU
        mode: Mode = Mode.FAST
        level: Level = Level.LOW

    previous = _previous_to_dict(Enums(act=Act.GELU, mode=Mode.SLOW, level=Level.HIGH))
    assert (previous["act"], previous["mode"], previous["level"]) == ("Act.GELU", "slow", 2)
    back = from_dict(Enums, previous)
    assert (back.act, back.mode, back.level) == (Act.GELU, Mode.SLOW, Level.HIGH)


def test_paths_and_tuples_keep_their_json_form():
    @dataclasses.dataclass(frozen=True)
    class Files:
        root: Path = Path("/data")
        sizes: tuple[int, int] = (3, 4)

    assert to_dict(Files()) == {"root": "/data", "sizes": [3, 4]}
    assert from_dict(Files, to_dict(Files())) == Files()


@dataclasses.dataclass(frozen=True)
class _DataclassOrDict:
    opt: SGD | dict[str, float] = dataclasses.field(default_factory=lambda: {"lr": 0.3})


def test_a_union_of_one_dataclass_and_a_dict_keeps_which_it_held():
    """Without a tag the dict {"lr": 0.3} came back as SGD(lr=0.3): the dataclass read it."""
    for cfg in (_DataclassOrDict(), _DataclassOrDict(opt=SGD(lr=0.5))):
        back = from_dict(_DataclassOrDict, json.loads(json.dumps(to_dict(cfg))))
        assert back == cfg and type(back.opt) is type(cfg.opt)
    assert to_dict(_DataclassOrDict()) == {"opt": {"lr": 0.3}}  # a dict needs no tag
