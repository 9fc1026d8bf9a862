# `apf-emu campaign --kubernetes`: the campaign as manifests instead of processes. An Indexed Job whose completion
# index is the case (the cases' order is apf_emu/cases.py's make_cases, from the same seeds, ABIs and scenarios
# that every container is given), each pod one VM as apf_emu/pod.py lays it out: a `host` container (the case's
# harness, exit status = verdict) and a `guest-<vcpu>` container per vCPU, one image (the compose image), the
# pod's IPC and PID namespaces shared, emptyDir volumes for the run directory and the logs. A Pod of one case, the
# same template with its index written in, is what `podman kube play` runs (the suite's test, a trial without a
# cluster). docs/KUBERNETES.md describes the layout and what was run against what.
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import yaml

from .cases import Case, Settings
from .pod import LOG_DIR, RUN_DIR

DEFAULT_IMAGE: Final = "apf-emu:local"
LABEL: Final = "apf-emu/campaign"
# What a pod may take beyond the case's duration: image pull, start, the stop and the check.
DEADLINE_MARGIN_S: Final = 600


def case_args(seeds: str, abis: Sequence[str], scenarios: Sequence[str | None], settings: Settings) -> list[str]:
    """The options every container is given, from which each computes the campaign's cases and takes its own."""
    return ["--seeds", seeds, "--abis", ",".join(abis),
            "--scenarios", ",".join(s or "none" for s in scenarios), *settings.chaos_args()]


def pod_spec(args: Sequence[str], settings: Settings, image: str, *, index: int | None = None) -> dict[str, Any]:
    """The pod of a case; `index` None: the Job's template (the index is JOB_COMPLETION_INDEX, set by Kubernetes)."""
    at = [] if index is None else ["--index", str(index)]
    mounts = [{"name": "run", "mountPath": str(RUN_DIR)}, {"name": "logs", "mountPath": str(LOG_DIR)}]
    common = {"image": image, "imagePullPolicy": "IfNotPresent", "volumeMounts": mounts,
              "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}]}
    containers = [{"name": "host", "command": ["apf-emu", "pod", "host", *at, *args], **common,
                   "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}}]
    for vcpu in range(settings.vcpus):
        containers.append({"name": f"guest-{vcpu}", "command": ["apf-emu", "pod", "guest", "--vcpu", str(vcpu), *at,
                                                                *args], **common,
                           "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}}})
    return {
        "restartPolicy": "Never",
        # One PID namespace: the signal transport's signals and the chaos schedule's reach across containers.
        "shareProcessNamespace": True,
        "terminationGracePeriodSeconds": 60,
        "activeDeadlineSeconds": int(settings.duration) + DEADLINE_MARGIN_S,
        "containers": containers,
        "volumes": [{"name": "run", "emptyDir": {}}, {"name": "logs", "emptyDir": {}}],
    }


def job(name: str, args: Sequence[str], cases: Sequence[Case], settings: Settings, image: str,
        parallel: int) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "apf-emu", LABEL: name}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {"apf-emu/cases": str(len(cases)), "apf-emu/first-case": cases[0].id}},
        "spec": {
            "completionMode": "Indexed",
            "completions": len(cases),
            "parallelism": parallel,
            # A case's verdict is its result, not a flake to retry: each index runs once (Kubernetes 1.29+), and
            # every failing case is still one result; a pod evicted or preempted is run again.
            "backoffLimitPerIndex": 0,
            "maxFailedIndexes": len(cases),
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                {"action": "FailIndex", "onExitCodes": {"containerName": "host", "operator": "NotIn",
                                                        "values": [0]}},
            ]},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec(args, settings, image)},
        },
    }


def pod(name: str, campaign: str, args: Sequence[str], case: Case, index: int, settings: Settings,
        image: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "apf-emu", LABEL: campaign,
                                                  "apf-emu/case": case.id}},
            "spec": pod_spec(args, settings, image, index=index)}


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # the containers share their mounts: written out in each, as people write manifests


def dump(manifest: dict[str, Any]) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=120)
