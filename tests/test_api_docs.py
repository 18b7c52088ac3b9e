"""The README's "Your own network" section and docs/api.md say what the code does: the example spec
compiles as described, the errors it quotes are the ones raised, and every TrainOptions field and
ProgressEvent field is in the API reference."""

from __future__ import annotations

import copy
import re
from dataclasses import fields

import pytest
import yaml

from gndgl_compiler import GndglError
from gndgl_compiler.api import plan_spec
from paths import REPO

README = (REPO / "README.md").read_text()
API = (REPO / "docs" / "api.md").read_text()


def own_section() -> str:
    return README.split("## Your own network", 1)[1].split("\n## ", 1)[0]


def own_spec() -> dict:
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", own_section(), flags=re.S).group(1))


def test_own_network_example_compiles_as_described():
    plan = plan_spec(own_spec())
    assert [p.name for p in plan.partitions] == ["m1.g0", "m1.g1", "m2.g0", "m2.g1", "m3.g0", "m3.g1", "head"]
    assert plan.summary["inference_speedup"] == pytest.approx(1.0)
    default_head = own_spec()
    default_head["local"].pop("final_head")
    assert f"{plan_spec(default_head).summary['inference_speedup']:.2f}" == "0.68"


@pytest.mark.parametrize("change, quoted", [
    (lambda d: d["model"]["layers"].insert(3, {"op": "lstm", "out": 32}),
     "field 'model.layers[3]': unknown op \"lstm\"; allowed ops: conv, bn, relu"),
    (lambda d: d["model"]["layers"][0].update(groups=2),
     "field 'model.layers[0].groups': unknown key 'groups'; "
     "allowed keys here: bias, kernel, name, op, out, padding, stride"),
    (lambda d: d["model"]["layers"].pop(),
     "field 'model': the network must end in a linear classifier with num_classes=10 outputs; its last unit is "
     "'flatten12' (flatten)"),
    (lambda d: d["cuts"].update(width=3),
     "field 'cuts.width': module 1 (units c1..maxpool3), G=3: G=3 does not divide 32 channels; choose a divisor of 32 "
     "or set cuts.split: balanced"),
])
def test_own_network_errors_are_the_ones_quoted(change, quoted):
    d = copy.deepcopy(own_spec())
    change(d)
    with pytest.raises(GndglError) as err:
        plan_spec(d)
    assert quoted in str(err.value)
    assert " ".join(quoted.split()) in " ".join(own_section().split()).replace("`", "")


def test_api_reference_lists_every_option_and_event_field():
    from gndgl_compiler import TrainOptions
    from gndgl_compiler.runtime.run.progress import ProgressEvent

    for f in fields(TrainOptions):
        assert f"| `{f.name}` |" in API, f.name
    for f in fields(ProgressEvent):
        assert f"`{f.name}`" in API, f.name
    assert "(docs/api.md)" in README
