"""One source of truth for defaults: the experiments' configs take the library's defaults, and a
YAML file under conf/ sets a value only where it differs on purpose, saying why on that line."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import adalora
from experiments import config as C
from exp_utils import compose

CONF = Path(__file__).resolve().parent.parent / "conf"

# experiments key -> (library owner, name). The library's defaults, read here independently.
MIRRORS = {
    ("method", "target_regex"): (adalora.AdapterConfig, "target_regex"),
    ("method", "init_rank"): (adalora.AdapterConfig, "init_rank"),
    ("method", "alpha"): (adalora.AdapterConfig, "alpha"),
    ("method", "dropout"): (adalora.AdapterConfig, "dropout"),
    ("method", "rslora"): (adalora.AdapterConfig, "rslora"),
    ("method", "rank_pattern"): (adalora.AdapterConfig, "rank_pattern"),
    ("method", "fuse"): (adalora.AdapterConfig, "fuse"),
    ("method", "orth_form"): (adalora.orthogonality_penalty, "form"),
    ("schedule", "target_rank"): (adalora.ScheduleConfig, "target_rank"),
    ("schedule", "target_total"): (adalora.ScheduleConfig, "target_total"),
    ("schedule", "mask_interval"): (adalora.ScheduleConfig, "mask_interval"),
    ("schedule", "shape"): (adalora.ScheduleConfig, "shape"),
    ("schedule", "beta1"): (adalora.ScoreConfig, "beta1"),
    ("schedule", "beta2"): (adalora.ScoreConfig, "beta2"),
    ("schedule", "score"): (adalora.ScoreConfig, "kind"),
    ("schedule", "score_before_step"): (adalora.RankAllocator, "score_before_step"),
}
SECTIONS = {"method": C.MethodConfig, "schedule": C.ScheduleSection, "trainer": C.TrainerConfig,
            "logger": C.LoggerConfig, "model": C.ModelConfig, "task": C.TaskConfig,
            "budget": C.BudgetConfig}
IDENTITY = {"name", "dataset", "name_or_path", "match"}   # say which option a file is


def _library(owner, name):
    import inspect
    if dataclasses.is_dataclass(owner):
        return getattr(owner(), name)
    return inspect.signature(owner).parameters[name].default


def _default(section, key):
    return getattr(SECTIONS[section](), key)


def _declared(path: Path, key: str) -> bool:
    """The line that sets ``key`` carries a comment saying why."""
    return any(line.split(":")[0].strip() == key and "#" in line for line in path.read_text().splitlines())


@pytest.mark.parametrize("section,key", sorted(MIRRORS))
def test_experiments_dataclasses_take_the_library_defaults(section, key):
    assert _default(section, key) == _library(*MIRRORS[(section, key)])


def test_warmup_ratios_are_the_library_warmups_over_its_total():
    lib = adalora.ScheduleConfig()
    s = C.ScheduleSection()
    assert (s.init_warmup_ratio, s.final_warmup_ratio) == (lib.init_warmup / lib.total_steps,
                                                           lib.final_warmup / lib.total_steps)


def test_allowed_values_are_the_library_ones():
    with pytest.raises(C.ConfigError, match="cubic, linear, constant"):
        C.ScheduleSection(shape="exp")
    for kind in adalora.config.SCORE_KINDS:
        assert C.ScheduleSection(score=kind).score_config(0).kind == kind
    with pytest.raises(C.ConfigError, match="schedule: ScoreConfig.beta1"):
        C.ScheduleSection(beta1=1.0)
    with pytest.raises(C.ConfigError, match="method: AdapterConfig.alpha"):
        C.MethodConfig(alpha=-1.0)


@pytest.mark.parametrize("group", sorted(SECTIONS))
def test_yaml_sets_only_values_that_differ_from_the_dataclass(group):
    for path in sorted((CONF / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        for key, value in values.items():
            if key in ("defaults",) or key in IDENTITY:
                continue
            assert value != _default(group, key), f"{path.name}: {key}: {value!r} repeats the default"


@pytest.mark.parametrize("group", ["method", "schedule"])
def test_yaml_values_that_differ_from_the_library_say_why(group):
    for path in sorted((CONF / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        for key, value in values.items():
            if (group, key) in MIRRORS and value != _library(*MIRRORS[(group, key)]):
                assert _declared(path, key), f"{path.name}: {key} differs from the library without a reason"


def test_the_composed_default_run_differs_from_the_library_only_where_declared():
    rc, _ = compose([])
    differs = {(s, k) for (s, k), ref in MIRRORS.items() if getattr(getattr(rc, s), k) != _library(*ref)}
    assert differs == {("schedule", "target_rank"), ("schedule", "mask_interval")}
    assert all(_declared(CONF / "schedule" / "default.yaml", k) for _, k in differs)
