"""Configuration models (regcli.config.ConfigModel and its subclasses): what they refuse, and that everything
shipped (docs/recipes, weights/) still loads through the paths the commands use."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import invoke, one_line
from regcli.config import METHOD_PRESETS, ConfigModel, RegisterConfig, build_config
from regcli.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
#: the modules that define user-facing configuration models (register config, training jobs and recipes, the
#: networks' ``net`` configurations, dataset manifests)
CONFIG_MODULES = ("regcli.config", "regcli.manifest", "regcli.models.gradicon", "regcli.models.promptreg",
                  "regcli.models.dio", "regcli.models.embedding", "regcli.training.jobs", "regcli.training.dio",
                  "regcli.training.pairs", "regcli.training.optron", "regcli.training.embedding",
                  "regcli.training.foundation", "regcli.training.promptreg")


def _config_models() -> list[type]:
    for name in CONFIG_MODULES:
        importlib.import_module(name)
    found, todo = [], list(ConfigModel.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: (c.__module__, c.__name__))


def _boolean_where_a_number_goes(prop: dict):
    """From a field's JSON schema: a value holding a boolean where the field takes a number (the number itself,
    or the second item of a list of numbers), and the position named in the error; None for other fields."""
    branches = prop.get("anyOf", [prop])
    if any(b.get("type") in ("integer", "number") for b in branches):
        return True, "true"
    for b in branches:
        if b.get("type") == "array":
            items = b.get("prefixItems") or [b.get("items", {})] * 2
            if all(i.get("type") in ("integer", "number") for i in items):
                return [1, True, *[1] * (len(items) - 2)], "item 1: true"
    return None


def _numeric_fields():
    for cls in _config_models():
        for name, prop in cls.model_json_schema()["properties"].items():
            probe = _boolean_where_a_number_goes(prop)
            if probe is not None:
                yield pytest.param(cls, name, *probe, id=f"{cls.__name__}.{name}")


def test_every_config_model_is_covered():
    names = {c.__name__ for c in _config_models()}
    assert {"RegisterConfig", "InstanceConfig", "SamConvexConfig", "GradICONConfig", "PromptRegConfig",
            "DioNetConfig", "EmbeddingConfig", "Dataset", "DioTrainConfig", "PairTrainConfig", "Augment",
            "OptronConfig", "EmbeddingTrainConfig", "EmbeddingJob", "DioJob", "FoundationJob",
            "PromptRegJob"} <= names, names
    assert len(list(_numeric_fields())) > 100


@pytest.mark.parametrize("cls,name,value,where", list(_numeric_fields()))
def test_a_boolean_is_not_taken_for_a_number(cls, name, value, where):
    """YAML/JSON true/false for an int or float field, or as an item of a tuple of them, is an error at that key
    (pydantic's lax mode read it as 1 or 0: `instance.iterations: true` ran 1 iteration)."""
    with pytest.raises(ValidationError) as e:
        cls.model_validate({name: value})
    at_key = [err for err in e.value.errors() if err["loc"] == (name,)]
    assert len(at_key) == 1 and at_key[0]["type"] == "bool_for_number", at_key
    assert at_key[0]["msg"] == f"Input should be a number, not a boolean ({where})"


def _boolean_fields():
    for cls in _config_models():
        for name, prop in cls.model_json_schema()["properties"].items():
            if {b.get("type") for b in prop.get("anyOf", [prop])} - {"null"} == {"boolean"}:
                yield pytest.param(cls, name, id=f"{cls.__name__}.{name}")


@pytest.mark.parametrize("cls,name", list(_boolean_fields()))
def test_a_boolean_field_takes_only_true_or_false(cls, name):
    """pydantic's lax mode read "yes", "off", "true", 1 and 0.0 as booleans (`affine.enabled: 0` switched the stage
    off as `false` does); no input path delivers a boolean as a string or number, so each is an error at the key."""
    for value, given in (("yes", "'yes'"), ("true", "'true'"), (1, "1"), (0.0, "0.0"), ([True], "a list")):
        with pytest.raises(ValidationError) as e:
            cls.model_validate({name: value})
        at_key = [err for err in e.value.errors() if err["loc"] == (name,)]
        assert len(at_key) == 1 and at_key[0]["type"] == "bool_strict", at_key
        assert at_key[0]["msg"] == f"Input should be true or false, not {given}"
    assert getattr(cls.model_validate({name: False}), name) is False


def test_a_non_boolean_in_a_config_file_is_a_one_line_config_error(tmp_path):
    """Through the command line: exit 7, one line naming the file and the dotted key; YAML's unquoted yes/no/on/off
    are booleans (yaml.safe_load reads YAML 1.1) and still work."""
    assert len(list(_boolean_fields())) >= 10
    for text, key in (("affine: {enabled: 'no'}", "affine.enabled: Input should be true or false, not 'no'"),
                      ("deterministic: 1", "deterministic: Input should be true or false, not 1"),
                      ('prompts: {landmarks: "x\\ny"}', "prompts.landmarks: Input should be true or false, not "
                                                        "'x\\ny'")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text + "\n")
        res = invoke("config", "show", "--config", bad)
        line = one_line(res.stderr)
        assert res.exit_code == 7 and line == f"ConfigError: invalid configuration ({bad}): {key}", line
    ok = tmp_path / "ok.yaml"
    ok.write_text("affine: {enabled: no}\ndeterministic: on\nhtml_report: off\n")
    res = invoke("config", "show", "--config", ok, "--json")
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["affine"]["enabled"] is False and shown["deterministic"] is True and shown["html_report"] is False


def test_numbers_are_read_as_before():
    """Only booleans changed: an integer for a float field, a float with an integral value for a plain int field
    (as before; StrictInt fields refuse it, as before), and YAML 1.1's dotless exponent (a string) still work."""
    from regcli.training.pairs import PairTrainConfig

    cfg = build_config(None, {"instance": {"learning_rate": 1, "iterations": 10.0, "refine_learning_rate": "1e-1"},
                              "samconvex": {"levels": [8.0, 4, 2]}, "prompts": {"labels": [1, 2]}})
    assert cfg.instance.learning_rate == 1.0 and isinstance(cfg.instance.learning_rate, float)
    assert cfg.instance.iterations == 10 and isinstance(cfg.instance.iterations, int)
    assert cfg.instance.refine_learning_rate == 0.1 and cfg.samconvex.levels == (8, 4, 2)
    assert cfg.prompts.labels == (1, 2) and build_config(None, {"prompts": {"labels": "all"}}).prompts.labels == "all"
    assert RegisterConfig.model_validate({"instance": {"refine_reg_weight": None}}).instance.refine_reg_weight is None
    assert build_config(None, {"instance": {"enabled": False}, "affine": {"enabled": True}}).instance.enabled is False
    with pytest.raises(ConfigError, match=r"instance.iterations: .*fractional part"):
        build_config(None, {"instance": {"iterations": 10.5}})
    with pytest.raises(ValidationError, match="iterations"):
        PairTrainConfig.model_validate({"iterations": 10.0})


def test_a_boolean_in_a_config_file_is_a_one_line_config_error(tmp_path):
    """Through the command line: exit 7, one line naming the file and the dotted key; the flags refuse it before
    (click parses them as numbers: usage error, exit 2)."""
    for text, key in (("instance: {iterations: true}", "instance.iterations: Input should be a number, not a "
                                                           "boolean (true)"),
                      ("samconvex: {levels: [8, false, 2]}", "samconvex.levels: Input should be a number, not a "
                                                             "boolean (item 1: false)"),
                      ("working_spacing_mm: true", "working_spacing_mm:"), ("threads: true", "threads:"),
                      ("affine: {learning_rate: true}", "affine.learning_rate:")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text + "\n")
        res = invoke("config", "show", "--config", bad)
        line = one_line(res.stderr)
        assert res.exit_code == 7 and line.startswith(f"ConfigError: invalid configuration ({bad}): {key}"), line
    for flag in ("--iterations", "--threads", "--seed", "--working-spacing", "--fine-spacing", "--intensity-weight",
                 "--max-memory"):
        res = invoke("config", "show", flag, "true")
        assert res.exit_code == 2 and "Invalid value for" in res.output and flag in res.output, (flag, res.output)


#: integer fields where a negative number means something: seeds, and label ids (a label map may hold any integer)
SIGNED_INTEGERS = {"RegisterConfig.seed", "DioTrainConfig.seed", "PairTrainConfig.seed", "EmbeddingTrainConfig.seed",
                   "PromptConfig.labels", "Dataset.label_ids"}


def _validation_errors(cls, data: dict) -> set:
    try:
        cls.model_validate(data)
    except ValidationError as e:
        return {(tuple(err["loc"]), err["msg"]) for err in e.errors()}
    return set()


def _negative_integer_probes():
    """From the JSON schemas: every integer field, or tuple of integers (the default's items with the first one
    -1), of every config model, with a negative value to validate."""
    for cls in _config_models():
        for name, prop in cls.model_json_schema()["properties"].items():
            branches = prop.get("anyOf", [prop])
            if any(b.get("type") == "integer" for b in branches):
                probe = -1
            else:
                arrays = [b.get("prefixItems") or [b.get("items", {})] for b in branches if b.get("type") == "array"]
                arrays = [items for items in arrays if all(i.get("type") == "integer" for i in items)]
                if not arrays:
                    continue
                default = cls.model_fields[name].default
                probe = list(default) if isinstance(default, (tuple, list)) else [2] * len(arrays[0])
                probe[0] = -1
            yield pytest.param(cls, name, probe, id=f"{cls.__name__}.{name}")


@pytest.mark.parametrize("cls,name,probe", list(_negative_integer_probes()))
def test_no_count_takes_a_negative_number(cls, name, probe):
    """Iteration counts, voxel and channel counts, levels, radii, dilations, steps: a negative one is refused at
    validation (`dio.iterations: [-1, 40, 20]` and `affine.iterations: [-5, 20]` ran as 0 iterations at that
    level); only seeds and label ids take any integer."""
    new = _validation_errors(cls, {name: probe}) - _validation_errors(cls, {})
    assert bool(new) == (f"{cls.__name__}.{name}" not in SIGNED_INTEGERS), new


def test_a_negative_iteration_count_in_a_config_file_is_a_one_line_config_error(tmp_path):
    """Per-level iteration counts are bounded item by item (0 still skips a level); the error names the item."""
    for text, key in (("dio: {iterations: [40, -1, 10]}", "dio.iterations.1"),
                      ("affine: {iterations: [-5, 20]}", "affine.iterations.0")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text + "\n")
        res = invoke("config", "show", "--config", bad)
        line = one_line(res.stderr)
        assert res.exit_code == 7 and line == (f"ConfigError: invalid configuration ({bad}): {key}: Input should be "
                                               "greater than or equal to 0"), line
    cfg = build_config(None, {"dio": {"iterations": [0, 0, 2]}, "affine": {"iterations": [0, 20]}})
    assert cfg.dio.iterations == (0, 0, 2) and cfg.affine.iterations == (0, 20)


@pytest.mark.parametrize("over,key,problem", [
    ({"method": "dio", "dio": {"levels": [], "iterations": [], "learning_rates": []}}, "dio.levels",
     "at least 1 item"),
    ({"affine": {"levels_mm": [], "iterations": []}}, "affine.levels_mm", "at least 1 item"),
    ({"affine": {"levels_mm": [-8, 4]}}, "affine.levels_mm.0", "greater than 0"),
    ({"method": "dio", "dio": {"learning_rates": [1, 0, 0.5]}}, "dio.learning_rates.1", "greater than 0"),
    ({"convex": {"coupling_weights": [0.1, -1]}}, "convex.coupling_weights.1", "greater than or equal to 0"),
    ({"method": "samconvex", "samconvex": {"coupling_weights": [-0.5]}}, "samconvex.coupling_weights.0",
     "greater than or equal to 0"),
])
def test_per_level_sizes_steps_and_coupling_weights_are_bounded(over, key, problem):
    """An empty level list (DIO indexed its last level: an IndexError), a negative or zero level size or step, and a
    negative coupling weight (it rewards leaving the smooth field) are ConfigErrors naming the item."""
    with pytest.raises(ConfigError) as e:
        build_config(None, over)
    assert f"{key}: " in str(e.value) and problem in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert build_config(None, {"convex": {"coupling_weights": []}}).convex.coupling_weights == ()  # argmin only


# ------------------------------------------------------------------------------ what is shipped still loads
def _job_loader(name: str):
    from regcli.training.dio import load_dio_job
    from regcli.training.foundation import load_foundation_job
    from regcli.training.jobs import load_job
    from regcli.training.promptreg import load_promptreg_job

    for prefix, load in (("dio_", load_dio_job), ("foundation_", load_foundation_job),
                         ("promptreg_", load_promptreg_job), ("sam_embedding_", load_job)):
        if name.startswith(prefix):
            return load
    return None


RECIPES = sorted((ROOT / "docs" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_shipped_recipe_loads(recipe):
    """Training jobs (a top-level `data`) through the loader `regcli train <task> --config` uses; registration
    configs through `regcli config show --config` (build_config, as `regcli register --config`) with every
    method."""
    import yaml

    data = yaml.safe_load(recipe.read_text())
    load = _job_loader(recipe.name)
    if "data" in data:
        assert load is not None, f"{recipe.name}: a training job whose task the test does not know"
        job = load(recipe)
        assert job.model_dump(mode="json")
        return
    assert load is None
    for method in METHOD_PRESETS:
        res = invoke("config", "show", "--config", recipe, "--method", method, "--json")
        assert res.exit_code == 0, (method, res.output)
        assert json.loads(res.stdout)["method"] == method


MODELS = sorted(p.parent for p in (ROOT / "weights").glob("*/config.json"))


@pytest.mark.parametrize("folder", MODELS, ids=[m.name for m in MODELS])
def test_every_shipped_network_loads(folder):
    """Each shipped model folder's `net` section builds its network (regcli.models.network_from, as registration
    and `regcli weights info` load it)."""
    from regcli.models import network_from
    from regcli.weights import resolve

    assert network_from(resolve(str(folder))) is not None


def test_no_float_setting_takes_nan_or_an_infinity(tmp_path):
    """`working_spacing_mm: .inf` used to pass validation and fail later (exit 4, a numpy warning on stderr);
    `instance.learning_rate: .inf` ended as a diverged registration (exit 5)."""
    from regcli.errors import ConfigError

    for value in (float("inf"), float("-inf"), float("nan")):
        for over in ({"working_spacing_mm": value}, {"instance": {"learning_rate": value}},
                     {"affine": {"learning_rate": value}}):
            with pytest.raises(ConfigError, match="finite number"):
                build_config(None, over)


def test_a_key_given_twice_in_a_yaml_mapping_is_refused(tmp_path):
    """yaml.safe_load keeps the last of two equal keys: `method: affine` then `method: rigid` ran rigid silently.
    Keys a merge (<<: *base) brings in may still be overridden."""
    from regcli.config import load_yaml, yaml_safe_load

    (tmp_path / "c.yaml").write_text("method: affine\ninstance:\n  iterations: 5\nmethod: rigid\n")
    with pytest.raises(ConfigError, match="found the key 'method' twice in one mapping.*line 4"):
        load_yaml(tmp_path / "c.yaml")
    res = invoke("config", "show", "--config", tmp_path / "c.yaml")
    assert res.exit_code == 7 and "twice" in one_line(res.stderr)
    merged = yaml_safe_load("base: &b {iterations: 5, lr: 1}\ninstance:\n  <<: *b\n  iterations: 7\n")
    assert merged["instance"] == {"iterations": 7, "lr": 1}


SEED_MAX = 2 ** 63 - 1


def test_a_seed_outside_64_bits_is_refused_naming_it(tmp_path):
    """`--seed 99999999999999999999` reached torch.manual_seed: "unexpected ValueError: Overflow when unpacking long
    long (this is a bug in regcli)", exit 1. Every flag and key that sets a seed takes a signed 64-bit integer (what
    torch's generators take); negative seeds stay allowed (SIGNED_INTEGERS)."""
    job = tmp_path / "job.yaml"
    job.write_text("data:\n  - glob: imgs/*.nii.gz\n")
    for big in (str(SEED_MAX + 1), "99999999999999999999", str(-SEED_MAX - 2)):
        res = invoke("config", "show", "--seed", big)
        assert res.exit_code == 2 and "Invalid value for" in res.output and "--seed" in res.output, res.output
        res = invoke("train", "embedding", "--config", job, "-o", tmp_path / "o", "--seed", big)
        assert res.exit_code == 2 and "--seed" in res.output and not (tmp_path / "o").exists(), res.output
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"seed: {big}\n")
        res = invoke("config", "show", "--config", bad)
        line = one_line(res.stderr)
        assert res.exit_code == 7 and line.startswith(f"ConfigError: invalid configuration ({bad}): seed: "), line
    for ok in (0, -1, SEED_MAX, -SEED_MAX - 1):
        assert build_config(None, {"seed": ok}).seed == ok
        res = invoke("config", "show", "--seed", ok, "--json")
        assert res.exit_code == 0 and json.loads(res.stdout)["seed"] == ok, res.output


def test_a_training_seed_outside_what_its_generators_take_is_refused_naming_it(tmp_path):
    """`train.seed` of every training job: a signed 64-bit integer; the embedding's also seeds numpy's default_rng,
    which takes no negative seed (it failed mid-run)."""
    from regcli.training.dio import load_dio_job
    from regcli.training.foundation import load_foundation_job
    from regcli.training.jobs import load_job
    from regcli.training.promptreg import load_promptreg_job

    job = tmp_path / "job.yaml"
    for load in (load_job, load_dio_job, load_foundation_job, load_promptreg_job):
        for seed, ok in ((SEED_MAX + 1, False), (-SEED_MAX - 2, False), (SEED_MAX, True),
                         (-1, load is not load_job)):
            job.write_text(f"data:\n  - glob: imgs/*.nii.gz\ntrain: {{seed: {seed}}}\n")
            if ok:
                assert load(job).train.seed == seed
                continue
            with pytest.raises(ConfigError, match=r"train\.seed: -?\d+ is outside") as e:
                load(job)
            assert "\n" not in str(e.value)
        assert load(job, {"train": {"seed": 3}}).train.seed == 3
