# apf_emu/kube.py: the manifests of `apf-emu campaign --kubernetes`, validated offline against the Kubernetes API's
# own models (the kubernetes client's pydantic models, generated from the API's OpenAPI schema): every field known,
# of its type, every required one present. Every container's command is one `apf-emu pod` takes, naming the case
# that the Job's completion index (or the Pod's --index) stands for.
from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pydantic
import pytest
import yaml

from apf_emu import cli, cli_campaign
from apf_emu.cli import main


def schema_errors(data: Any, model: type[Any]) -> list[str]:
    """What in `data` does not fit the API's `model` (kubernetes.client's models are pydantic models of the API's
    OpenAPI schema: unknown fields, wrong types and missing required fields are errors)."""
    try:
        model.model_validate(data)
    except pydantic.ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return []


@pytest.fixture
def manifests(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    args = ["campaign", "--kubernetes", "--seeds", "1-3,7", "--abis", "int,pf", "--scenarios", "none,bz208081",
            "--vcpus", "2", "--transport", "signal", "--duration", "20", "--out", str(tmp_path), "--pod", "5",
            "--image", "registry.example/apf-emu:1"]
    assert main(args) == 0
    job = yaml.safe_load((tmp_path / "job.yaml").read_text())
    pod = yaml.safe_load((tmp_path / "pod-5.yaml").read_text())
    cases, _settings = cli_campaign.case_set(cli.build_parser().parse_args(args))
    return job, pod, cases


def test_the_job_and_the_pod_fit_the_kubernetes_api(manifests: tuple[dict[str, Any], dict[str, Any], list[Any]]) \
        -> None:
    job, pod, cases = manifests
    assert schema_errors(job, k8s.V1Job) == []
    assert schema_errors(pod, k8s.V1Pod) == []
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["backoffLimitPerIndex"]) == ("Indexed", len(cases), 0)
    template = spec["template"]["spec"]
    assert template["shareProcessNamespace"] is True and template["restartPolicy"] == "Never"
    assert [c["name"] for c in template["containers"]] == ["host", "guest-0", "guest-1"]
    assert {c["image"] for c in template["containers"]} == {"registry.example/apf-emu:1"}


def test_a_field_the_api_does_not_have_is_found() -> None:  # the validator can fail
    assert schema_errors({"spec": {"containers": [{"name": "a", "imag": "x"}]}}, k8s.V1Pod) == \
        ["spec.containers.0.imag: Extra inputs are not permitted"]
    assert schema_errors({"spec": {"containers": [{"image": "x"}]}}, k8s.V1Pod) == \
        ["spec.containers.0.name: Field required"]
    assert schema_errors({"spec": {"template": {}, "parallelism": "2"}}, k8s.V1Job) == \
        ["spec.parallelism: Input should be a valid integer"]


def test_every_container_names_the_case_of_its_index(manifests: tuple[dict[str, Any], dict[str, Any], list[Any]]) \
        -> None:
    job, pod, cases = manifests
    for container in job["spec"]["template"]["spec"]["containers"]:
        words = container["command"]
        assert words[:2] == ["apf-emu", "pod"]
        for index in (0, len(cases) - 1):
            args = cli.build_parser().parse_args([*words[1:], "--index", str(index)])
            assert cli_campaign.case_set(args)[0][args.index] == cases[index]
    host = next(c for c in pod["spec"]["containers"] if c["name"] == "host")
    args = cli.build_parser().parse_args(host["command"][1:])
    assert cli_campaign.case_set(args)[0][args.index] == cases[5]
    assert pod["metadata"]["labels"]["apf-emu/case"] == cases[5].id


def test_manifest_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["campaign", "--kubernetes", "--seeds", "1-2", "--out", str(tmp_path), "--pod", "2"]) == 2
    assert "--pod 2: the campaign has cases 0..1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["campaign", "--kubernetes", "--seeds", "1", "--name", "Bad_Name"])
    assert exit_.value.code == 2
    assert main(["campaign", "--seeds", "1", "--pod", "0", "--out", str(tmp_path)]) == 2
